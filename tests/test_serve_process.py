"""`trimode serve` as users run it (a subprocess, with its OpenAI front end) on a repository with a
one-request queue: past it a clear "overloaded" error (counted in the metrics); SIGTERM stops
tritonserver and its python backend stubs, leaving no process and no /dev/shm region, and freeing the
ports; the repository stays byte for byte what `trimode repo` wrote."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from trimode.triton_repo import client
from trimode.triton_repo.client import RemoteError
from trimode.triton_repo.server import SHM_DIR, Ports, TritonServer
from trimode.triton_repo.settings import RepoSettings
from trimode.triton_repo.writer import write_model_repo

from conftest import file_tree
from test_serve import metrics


def processes_using(path: Path) -> list[int]:
    """Live processes whose command line names path (tritonserver and every stub name the folder it serves)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = next(ln for ln in (entry / "status").read_text().splitlines() if ln.startswith("State:"))
            except (OSError, StopIteration):
                continue
            if str(path) in cmdline and "Z" not in state.split()[1]:  # a zombie is already gone
                pids.append(int(entry.name))
    return pids


def served_folder(serve_pid: int) -> Path:
    """The --model-repository of tritonserver, the serve process's child: the mirror of the repository
    that it serves (in its scratch folder), named by its command line and every stub's."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
                ppid = next(ln for ln in (entry / "status").read_text().splitlines() if ln.startswith("PPid:"))
            except (OSError, StopIteration):
                continue
            if int(ppid.split()[1]) == serve_pid:
                return Path(next(a for a in args if a.startswith("--model-repository=")).split("=", 1)[1])
    raise AssertionError(f"no tritonserver under process {serve_pid}")


def shm_prefix(serve_pid: int) -> str:
    """The python backend's /dev/shm region prefix of the tritonserver that the serve process started."""
    tritonserver = served_folder(serve_pid).parent  # its scratch folder: find tritonserver by its arguments
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            if f"--model-repository={tritonserver / 'repo'}" in args:
                return next(a for a in args if "shm-region-prefix-name=" in a).split("=")[-1]
    raise AssertionError(f"no tritonserver under process {serve_pid}")


@pytest.fixture(scope="module")
def served(tiny_engine_dir, tmp_path_factory):
    repo = write_model_repo(
        tiny_engine_dir, tmp_path_factory.mktemp("serve-process") / "repo", RepoSettings(max_queued_requests=1)
    )
    written = file_tree(repo)
    ports, openai_port = Ports.free(), Ports.free().http
    log_path = repo.parent / "serve.log"  # a file, not a pipe: tritonserver logs a lot and would block on a full pipe
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "trimode.cli",
                "serve",
                str(repo),
                "--http-port",
                str(ports.http),
                "--grpc-port",
                str(ports.grpc),
                "--metrics-port",
                str(ports.metrics),
                "--openai-port",
                str(openai_port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 300
    while "serving ar, diffusion, self_spec" not in log_path.read_text(errors="replace"):  # every model is ready
        assert process.poll() is None and time.monotonic() < deadline, log_path.read_text(errors="replace")[-2000:]
        time.sleep(0.25)
    assert f"OpenAI http://127.0.0.1:{openai_port}/v1" in log_path.read_text(errors="replace")
    mirror = served_folder(process.pid)
    yield SimpleNamespace(
        process=process, repo=repo, ports=ports, openai_port=openai_port, written=written, mirror=mirror
    )
    if process.poll() is None:
        process.kill()
        for pid in processes_using(mirror):
            os.kill(pid, signal.SIGKILL)


def test_past_the_queue_requests_are_overloaded(served):
    url = f"127.0.0.1:{served.ports.grpc}"
    server = TritonServer(served.repo, ports=served.ports)  # for its endpoints only
    results: dict[int, object] = {}
    # 4 slots + 1 queued, and 24 sent at once (threads started one by one may not overlap on a loaded box;
    # 8 at once were all served in turn in one CI run, where the 2 cores also ran other tests)
    sends = 24
    together = threading.Barrier(sends)

    def send(i: int) -> None:
        together.wait()
        try:
            results[i] = client.infer(url, "ar", {"text_input": "def f", "max_tokens": 80, "end_id": -1})
        except RemoteError as e:
            results[i] = e

    threads = [threading.Thread(target=send, args=(i,)) for i in range(sends)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    refused = [r for r in results.values() if isinstance(r, RemoteError)]
    served_ok = [r for r in results.values() if not isinstance(r, RemoteError)]
    assert len(results) == sends and len(refused) >= 1 and len(served_ok) >= 5  # 4 free slots + 1 queued
    assert all("overloaded" in str(e) and "retry later" in str(e) for e in refused)
    assert all(r["num_output_tokens"] == 80 for r in served_ok)
    scraped = metrics(server)
    assert scraped['trimode_requests_rejected_total{model="engine",reason="overloaded"}'] == len(refused)
    # the server still serves
    assert client.infer(url, "ar", {"text_input": "ok", "max_tokens": 2})["num_output_tokens"] >= 1


def test_the_repository_stays_as_written(served):
    """The python backend stubs import every model.py in it: no __pycache__ may appear there (the repo's
    manifest digests what `trimode repo` wrote, and a read-only repository must serve)."""
    assert served.mirror != served.repo and (served.mirror / "engine" / "1" / "__pycache__").is_dir()  # theirs
    assert file_tree(served.repo) == served.written


def test_sigterm_stops_the_server_cleanly(served):
    """Also after a cancelled stream, which must not count as in flight: SIGTERM drains (nothing is left to
    wait for, so at once) and exits 0 (tests/test_serve_lifecycle.py drains requests in flight)."""
    process, ports, openai_port = served.process, served.ports, served.openai_port
    assert len(processes_using(served.mirror)) >= 5  # tritonserver and a stub per python model
    regions = list(SHM_DIR.glob(f"{shm_prefix(process.pid)}*"))
    assert len(regions) >= 5  # a region per stub, under the server's own prefix
    models = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{openai_port}/v1/models", timeout=10).read())
    assert [m["id"] for m in models["data"]] == ["ar", "diffusion", "self_spec", "quadratic", "auto"]
    request = urllib.request.Request(
        f"http://127.0.0.1:{openai_port}/v1/completions",
        method="POST",
        data=json.dumps({"model": "ar", "prompt": "def f", "max_tokens": 3}).encode(),
    )
    assert json.loads(urllib.request.urlopen(request, timeout=60).read())["usage"]["completion_tokens"] >= 1
    stream = client.stream_grpc(
        f"127.0.0.1:{ports.grpc}", "ar", {"text_input": "def f", "max_tokens": 60, "end_id": -1}
    )
    next(stream)
    stream.close()
    time.sleep(1)
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0  # a bound for a hang, not a timing claim (loaded CI boxes)
    assert "drained in" in (served.repo.parent / "serve.log").read_text(errors="replace")
    deadline = time.monotonic() + 10
    while processes_using(served.mirror) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_using(served.mirror) == []
    assert not served.mirror.exists()  # the scratch folder is gone too
    assert not any(region.exists() for region in regions)
    for url in (f"http://127.0.0.1:{ports.http}/v2/health/ready", f"http://127.0.0.1:{openai_port}/v1/models"):
        with pytest.raises(OSError):
            urllib.request.urlopen(url, timeout=2)
