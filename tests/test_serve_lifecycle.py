"""`trimode serve` as a supervisor sees it (a subprocess, as users run it, with its OpenAI front end):
a python backend stub that dies stops the server at once, with exit 1 and one line naming it, every
request in flight failing and readiness gone; SIGTERM drains (new requests get UNAVAILABLE or 503,
those in flight finish with their full text, exit 0), and --drain-timeout bounds the drain. Nothing
is left behind: no process, no scratch folder, no /dev/shm region of the server's prefix."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from test_serve_process import processes_using

from trimode.triton_repo import client
from trimode.triton_repo.client import NoAnswer, RemoteError
from trimode.triton_repo.server import SHM_DIR, Ports
from trimode.triton_repo.settings import RepoSettings
from trimode.triton_repo.writer import write_model_repo

# at temperature 0, ignoring EOS: every request of the load has the same text, 75 tokens long
REQUEST = {"text_input": "def f", "max_tokens": 75, "end_id": -1, "temperature": 0.0}


class Served:
    """A `trimode serve` subprocess, ready, and what it started: tritonserver, its stubs, its folders."""

    def __init__(self, repo: Path, log_path: Path, *options: str):
        self.ports, self.openai_port = Ports.free(), Ports.free().http
        self.log_path = log_path
        ports = ["--http-port", self.ports.http, "--grpc-port", self.ports.grpc, "--metrics-port", self.ports.metrics]
        command = [sys.executable, "-m", "trimode.cli", "serve", repo, *ports, "--openai-port", self.openai_port]
        # the default layout: the engine model sends from a thread of its own (loop.py Outbox), and the
        # drains here must wait for the responses still queued there
        env = {k: v for k, v in os.environ.items() if k != "TRIMODE_SEND_THREAD"}
        with open(log_path, "wb") as log:  # a file: tritonserver logs a lot, and a full pipe would block it
            self.process = subprocess.Popen(
                [str(a) for a in [*command, *options]], stdout=log, stderr=subprocess.STDOUT, env=env
            )
        self.wait_for("serving ar, diffusion, self_spec", 300)
        self.triton_pid, args = next((pid, args) for pid, ppid, args in _processes() if ppid == self.process.pid)
        self.mirror = Path(next(a for a in args if a.startswith("--model-repository=")).split("=", 1)[1])
        self.shm_prefix = next(a for a in args if "shm-region-prefix-name=" in a).split("=")[-1]
        self.grpc_url = f"127.0.0.1:{self.ports.grpc}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_accepted(self, num_requests: int, timeout_s: float) -> None:
        """Until the engine has accepted num_requests (trimode_requests_total on the metrics endpoint)."""
        deadline = time.monotonic() + timeout_s
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports.metrics}/metrics", timeout=10) as response:
                lines = response.read().decode().splitlines()
            accepted = sum(
                float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("trimode_requests_total{")
            )
            if accepted >= num_requests:
                return
            assert time.monotonic() < deadline, f"{accepted} of {num_requests} requests accepted"
            time.sleep(0.02)

    def wait_for(self, text: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while text not in self.log():
            assert self.process.poll() is None and time.monotonic() < deadline, self.log()[-3000:]
            time.sleep(0.02)

    def stub_pid(self, model: str) -> int:
        return next(
            pid for pid, ppid, args in _processes() if ppid == self.triton_pid and f"/{model}/1/model.py" in args[1]
        )

    def shm_regions(self) -> list[str]:
        return sorted(p.name for p in SHM_DIR.glob(f"{self.shm_prefix}*"))

    def num_admitted(self) -> int:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.ports.metrics}/metrics", timeout=10).read().decode()
        return int(
            sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith("trimode_requests_total{"))
        )

    def assert_nothing_left(self) -> None:
        deadline = time.monotonic() + 10
        while processes_using(self.mirror) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert processes_using(self.mirror) == []
        assert not self.mirror.exists()  # the scratch folder is gone
        assert self.shm_regions() == []
        with pytest.raises(OSError):  # readiness: nothing answers any more
            urllib.request.urlopen(f"http://127.0.0.1:{self.ports.http}/v2/health/ready", timeout=2)


def _processes() -> list[tuple[int, int, list[str]]]:
    """(pid, ppid, arguments) of every live process."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            found.append((int(entry.name), int(stat[stat.rindex(")") + 2 :].split()[1]), args))
    return found


class Load:
    """num_requests copies of REQUEST at once, one thread each, streamed and whole in turn, over gRPC
    through the ar ensemble; results[i] is the request's text, or the error it ended with."""

    def __init__(self, url: str, num_requests: int):
        self.url, self.results = url, [None] * num_requests
        self.first = threading.Event()  # a streamed response arrived: the engine is generating
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(num_requests)]
        for thread in self.threads:
            thread.start()

    def _run(self, i: int) -> None:
        try:
            if i % 2 == 0:
                texts = []
                for response in client.stream_grpc(self.url, "ar", REQUEST, timeout_s=120):
                    self.first.set()
                    texts.append(response["text"])
                self.results[i] = "".join(texts)
            else:
                self.results[i] = client.infer(self.url, "ar", REQUEST)["text"]
        except RemoteError as e:
            self.results[i] = e

    def join(self, timeout_s: float) -> bool:
        """Whether every request ended (with its text or an error) within timeout_s."""
        deadline = time.monotonic() + timeout_s
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self.threads)


def openai_completion(port: int, results: list) -> None:
    """A whole OpenAI completion of REQUEST's prompt; appends (status, its JSON body)."""
    body = {"model": "ar", "prompt": REQUEST["text_input"], "max_tokens": 75, "ignore_eos": True, "temperature": 0}
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions", method="POST", data=json.dumps(body).encode()
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            results.append((response.status, json.loads(response.read())))
    except urllib.error.HTTPError as e:
        results.append((e.code, json.loads(e.read() or b"{}")))
    except OSError as e:  # refused: the server has stopped
        results.append((None, str(e)))


# --- serving()'s stop sequences, with stand-ins for tritonserver and the front end (no server) ------------
class FakeServer:
    failure = None
    endpoints = {"http": "http://h", "grpc": "h:1", "metrics": "http://h/metrics"}

    def __init__(self, *args, calls: list, threads: int | None = None):
        self.calls = calls

    def start(self):
        self.calls.append("start")

    def drain(self, timeout_s, frontend, cut):
        self.calls.append(("drain", timeout_s, frontend is not None))
        return True

    def stop(self):
        self.calls.append("stop")


class FakeFrontend:
    endpoint = "http://h:2/v1"

    def __init__(self, *args, calls: list, **limits):
        self.calls = calls
        calls.append(("frontend", limits))

    def open(self):
        return self

    def start(self):
        return self

    def start_draining(self):
        self.calls.append("frontend draining")

    def stop(self):
        self.calls.append("frontend stop")


@pytest.fixture
def fakes(monkeypatch, tmp_path):
    """A repo folder with a manifest, and the calls serving() makes on the stand-ins."""
    import functools

    from trimode.triton_repo import openai_api, server

    calls: list = []
    monkeypatch.setattr(server, "TritonServer", functools.partial(FakeServer, calls=calls))
    monkeypatch.setattr(openai_api, "OpenAIFrontend", functools.partial(FakeFrontend, calls=calls))
    (tmp_path / "manifest.json").write_text(json.dumps({"stage": "repo", "ensembles": {"ar": "ar"}}))
    return tmp_path, calls


@pytest.mark.parametrize(
    "signum, calls",
    [
        (  # SIGTERM: drain, then tritonserver, then the front end; the with block ends without an error
            signal.SIGTERM,
            [("drain", 7.0, True), "stop", "frontend stop"],
        ),
        (signal.SIGINT, ["frontend draining", "stop", "frontend stop"]),  # Ctrl-C: no drain, the interrupt goes on
    ],
)
def test_serving_stops_on_a_signal(fakes, signum, calls):
    from trimode.cli.serve import serving
    from trimode.errors import Interrupted

    repo_dir, made = fakes
    limits = {"max_connections": 3, "read_timeout_s": 1.5}
    with contextlib.ExitStack() as stack:
        if signum != signal.SIGTERM:
            stack.enter_context(pytest.raises(Interrupted))
        with serving(repo_dir, "127.0.0.1", Ports(1, 2, 3), openai_port=4, openai_limits=limits, drain_timeout_s=7.0):
            raise Interrupted(signum)
    assert made == [("frontend", limits), "start", *calls]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back


def test_serve_passes_the_openai_limits_on(fakes, runner, monkeypatch):
    from trimode.cli import main
    from trimode.cli import serve as serve_module

    repo_dir, made = fakes
    monkeypatch.setattr(serve_module, "wait_until_stopped", lambda server: None)
    options = ["--openai-max-body-bytes", "100", "--openai-read-timeout", "2.5", "--openai-max-connections", "9"]
    result = runner.invoke(main, ["serve", str(repo_dir), "--openai-port", "9000", *options])
    assert result.exit_code == 0, result.output
    assert made[0] == ("frontend", {"max_body_bytes": 100, "read_timeout_s": 2.5, "max_connections": 9})
    refused = runner.invoke(main, ["serve", str(repo_dir), "--openai-max-connections", "9"])
    assert refused.exit_code == 2 and "need --openai-port" in refused.output


# --- a real `trimode serve` ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def repo(tiny_engine_dir, tmp_path_factory):
    # a deep queue: the drain tests keep seconds of work in flight (one engine thread runs the tiny model fast)
    settings = RepoSettings(max_queued_requests=1024)
    return write_model_repo(tiny_engine_dir, tmp_path_factory.mktemp("serve-lifecycle") / "repo", settings)


@pytest.fixture
def start_serve(repo, tmp_path):
    """start_serve(*options) -> a ready Served; whatever a failed test leaves running is killed."""
    started: list[Served] = []

    def start(*options: str) -> Served:
        started.append(Served(repo, tmp_path / f"serve-{len(started)}.log", *options))
        return started[-1]

    yield start
    for served in started:
        if served.process.poll() is None:
            served.process.kill()
            served.process.wait()
        for pid in processes_using(served.mirror):
            os.kill(pid, signal.SIGKILL)
        for region in served.shm_regions():
            (SHM_DIR / region).unlink(missing_ok=True)


def test_a_dead_engine_stub_stops_the_server(start_serve):
    served = start_serve()
    reference = client.infer(served.grpc_url, "ar", REQUEST)["text"]
    # the thread layout: the repository's engine threads, and one OpenMP thread in the other stubs
    assert "trimode engine model: 1 torch threads" in served.log()
    environ = Path(f"/proc/{served.stub_pid('preprocessing_ar')}/environ").read_bytes().split(b"\0")
    assert b"OMP_NUM_THREADS=1" in environ or os.environ.get("OMP_NUM_THREADS")
    assert len(served.shm_regions()) >= 5  # one per python model instance, under the server's prefix
    engine = served.stub_pid("engine")
    load = Load(served.grpc_url, 16)  # 4 slots: the last ones wait for a slot
    assert load.first.wait(60)
    os.kill(engine, signal.SIGKILL)
    killed = time.monotonic()
    assert served.process.wait(15) == 1  # a bound for a hang; measured ~1.7 s
    errors = [line for line in served.log().splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, served.log()[-3000:]
    # the stub is named as the cause; its signal where its zombie was still there to read (tritonserver
    # may abort within the same watch interval and take it along: then it "is gone")
    assert re.search(
        rf"stub of model 'engine' \(pid {engine}\) (was killed by signal 9 \(SIGKILL\)|is gone)", errors[0]
    )
    assert load.join(15 - (time.monotonic() - killed))  # no request hangs
    cut = [r for r in load.results if isinstance(r, RemoteError)]
    assert cut and all(r == reference for r in load.results if not isinstance(r, RemoteError))
    served.assert_nothing_left()


def test_sigterm_drains_the_requests_in_flight(start_serve):
    served = start_serve("--drain-timeout", "60", "--threads", "2")
    assert "trimode engine model: 2 torch threads" in served.log()  # serve --threads over the repository's
    assert "trimode engine model: responses sent from a thread of their own" in served.log()  # the default
    reference = client.infer(served.grpc_url, "ar", REQUEST)["text"]
    assert len(reference) > 0
    num_before = served.num_admitted()
    load, openai_results = Load(served.grpc_url, 96), []  # ~7000 tokens: seconds of work for 4 slots
    threading.Thread(target=openai_completion, args=(served.openai_port, openai_results), daemon=True).start()
    deadline = time.monotonic() + 60
    while served.num_admitted() < num_before + 97:  # all accepted (the engine took them) before the SIGTERM
        assert time.monotonic() < deadline
        time.sleep(0.02)
    served.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    served.wait_for("SIGTERM: draining", 10)
    time.sleep(0.3)  # the engine looks for the drain file every 50 ms
    with pytest.raises(RemoteError) as refused:
        client.infer(served.grpc_url, "ar", REQUEST)
    # refused: by the draining engine (UNAVAILABLE), or, once the drain is done, by a Triton unloading or gone
    message = str(refused.value).lower()
    assert isinstance(refused.value, NoAnswer) or "unavailable" in message or "no available versions" in message
    late: list = []
    openai_completion(served.openai_port, late)
    assert late[0][0] in (503, None), late  # 503, or refused once stopped
    assert served.process.wait(60) == 0
    assert time.monotonic() - signalled < 30  # well before the drain timeout (measured ~4 s)
    assert "drained in" in served.log()
    assert load.join(10)
    assert load.results == [reference] * 96  # streamed and whole, each the full text
    assert len(openai_results) == 1 and openai_results[0][0] == 200, openai_results
    assert openai_results[0][1]["choices"][0]["text"] == reference
    served.assert_nothing_left()


def test_the_drain_timeout_bounds_the_drain(start_serve):
    # --drain-timeout 0: cut at once, whatever the machine's speed (a 0.5 s bound once passed on a CI
    # machine fast enough to finish the whole load inside it)
    served = start_serve("--drain-timeout", "0")
    load = Load(served.grpc_url, 128)  # ~9600 tokens: seconds of work for 4 slots
    assert load.first.wait(60)
    served.wait_accepted(24, 60)  # 24 of them in the engine (4 slots, the rest queued)
    served.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    assert served.process.wait(30) == 0  # a bound for a hang; measured ~2 s
    assert "--drain-timeout 0 s: cutting the requests still in flight" in served.log(), served.log()[-3000:]
    assert load.join(30 - (time.monotonic() - signalled))  # every request ended: done or cut
    cut = [r for r in load.results if isinstance(r, RemoteError)]
    assert cut and not any("overloaded" in str(e) for e in cut)  # cut by the stop, not refused
    served.assert_nothing_left()
