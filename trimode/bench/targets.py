"""What a bench runs its requests on: one interface, three targets.

A target is anything with `stream(ask) -> Iterator[Update]`: it sends one request and yields an
Update each time output tokens arrive, the last one with is_final; the runner timestamps them
(time to first token, latency). It may be called from many threads at once (the concurrency).

- `EngineTarget`: an engine dir in this process, driven by the same in-flight `EngineLoop` the
  Triton engine model runs (triton_repo/loop.py), so concurrency means what it means on a server.
- `TritonTarget`: a running `trimode serve`, the mode's ensemble, streamed over gRPC or HTTP.
- `OpenAITarget` (openai.py): an OpenAI-compatible /v1/completions endpoint.
"""

from __future__ import annotations

import http.client
import json
import queue
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from trimode.errors import MissingDependencyError, TrimodeError
from trimode.passes import Mode


class BenchError(TrimodeError):
    """A bench cannot run as asked (no server, a request that fails, bad settings)."""


@dataclass(frozen=True)
class Ask:
    """One request: greedy (temperature 0), this mode and block length (None: the target's default)."""

    prompt: str
    mode: Mode
    block_length: int | None
    max_tokens: int
    ignore_eos: bool = True


@dataclass(frozen=True)
class Update:
    num_tokens: int  # output tokens so far
    num_passes: int | None = None  # forward passes so far (None: the target does not say)
    mean_accepted_length: float | None = None
    is_final: bool = False


class Target(Protocol):
    kind: str

    @property
    def slots(self) -> int | None: ...  # requests the engine runs at once (None: unknown)
    @property
    def default_block_length(self) -> int | None: ...  # what block_length None means here (None: unknown)

    def describe(self) -> dict: ...
    def check(self, modes: list[Mode]) -> None: ...  # fail before any timing
    def pass_seconds(self) -> float | None: ...  # the engine's time inside passes so far (None: unknown)
    def stream(self, ask: Ask) -> Iterator[Update]: ...
    def close(self) -> None: ...


def _update(outputs: dict, final: bool) -> Update:
    """An Update from one engine/ensemble response's statistics (plain values or [1, 1] arrays)."""

    def scalar(name):
        v = outputs[name]
        return v.reshape(-1)[0].item() if hasattr(v, "reshape") else v

    accepted = scalar("mean_accepted_length")
    return Update(
        int(scalar("num_output_tokens")),
        int(scalar("num_forward_passes")),
        float(accepted) if accepted else None,
        final,
    )


class _QueueSink:
    """The EngineLoop's Sink for one request: its responses go to the client thread's queue."""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()

    def send(self, outputs, final: bool) -> None:
        """On the engine loop's thread: reads only the statistics the bench needs (no unpack)."""
        from trimode.triton_repo.response import mean_accepted_length, read_fields

        fields = read_fields(outputs.__getitem__)
        stats = {name: fields[name] for name in ("num_output_tokens", "num_forward_passes")}
        self.queue.put((None, _update({**stats, "mean_accepted_length": mean_accepted_length(fields)}, final)))

    def fail(self, message: str) -> None:
        self.queue.put((message, None))

    def close(self) -> None:
        self.queue.put(("cancelled", None))

    def is_cancelled(self) -> bool:
        return False

    def is_busy(self) -> bool:
        return False  # send is done when it returns


class EngineTarget:
    kind = "engine"

    def __init__(self, engine_dir: Path, time_steps: bool = False):
        """time_steps: time the steps of the modes auto chooses among, for save_step_times."""
        from trimode.builder.engine_dir import load_engine
        from trimode.decoding.step_times import StepTimes
        from trimode.triton_repo.loop import EngineLoop

        self.engine_dir = Path(engine_dir)
        self.built = load_engine(self.engine_dir)  # checks the files, re-runs the self-test
        self.slots = self.built.config.max_slots
        self.default_block_length = self.built.default_block_length
        engine = self.built.new_engine()
        engine.step_times = StepTimes() if time_steps else None  # before the loop runs a step
        self.loop = EngineLoop(engine, max_queued=1 << 20)  # the bench bounds its own load

    def save_step_times(self, about: dict) -> tuple[Path, dict]:
        """Store the steps timed so far with the engine (engine_dir.save_step_times), once the loop
        has stopped (close) -> the file and what it measured."""
        from trimode.builder.engine_dir import save_step_times

        assert self.loop.engine.step_times is not None, "built without time_steps"
        measured = self.loop.engine.step_times.table()
        return save_step_times(self.built, measured, about), measured

    def describe(self) -> dict:
        s = self.built.manifest["settings"]
        return {
            "kind": self.kind,
            "engine_dir": str(self.engine_dir),
            "backend": s["backend"],
            "device": s["device"],
            "slots": self.slots,
            "max_seq_len": s["max_seq_len"],
            "block_lengths": list(self.built.block_lengths),
            # the step times auto started from: saved by an earlier `bench --save-step-times`, or the build's
            "auto_step_times": "saved" if self.built.saved_step_times else "build",
        }

    def check(self, modes: list[Mode]) -> None:
        pass  # the warm-up requests meet the engine's own checks (prompt length, block lengths)

    def pass_seconds(self) -> float | None:
        return self.loop.engine.runner.clock.seconds

    def stream(self, ask: Ask) -> Iterator[Update]:
        from trimode.decoding import DecodeConfig, SamplingParams
        from trimode.triton_repo.loop import Job
        from trimode.triton_repo.request import Request

        prompt = self.built.checkpoint.tokenizer.encode(ask.prompt)
        request = Request(
            prompt,
            SamplingParams(ask.max_tokens, ignore_eos=ask.ignore_eos),
            DecodeConfig(ask.mode, ask.block_length),
            is_stream=True,
            prepend_prompt=False,
        )
        sink = _QueueSink()
        self.loop.submit(Job(request, sink))
        while True:
            error, update = sink.queue.get()
            if error:
                raise BenchError(f"{ask.mode.value}: {error}")
            yield update
            if update.is_final:
                return

    def close(self) -> None:
        self.loop.stop()


class TritonTarget:
    """A running `trimode serve` (HOST:PORT of its gRPC or HTTP endpoint); the model names carry prefix."""

    kind = "triton"
    default_block_length = None  # the server's engine model picks it

    def __init__(
        self,
        url: str,
        protocol: str = "grpc",
        prefix: str = "",
        timeout_s: float = 10.0,
        metrics_url: str | None = None,
    ):
        self.url, self.protocol, self.prefix, self.timeout_s = url, protocol, prefix, timeout_s
        self.metrics_url = metrics_url
        self.slots: int | None = None

    def pass_seconds(self) -> float | None:
        return served_pass_seconds(self.metrics_url, self.prefix)

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "url": self.url,
            "protocol": self.protocol,
            "prefix": self.prefix,
            "slots": self.slots,
            "metrics_url": self.metrics_url,
        }

    def check(self, modes: list[Mode]) -> None:
        """Fail fast: a server that answers, every mode's ensemble ready; read the engine model's slots."""
        from trimode.triton_repo.client import NoAnswer, model_name

        where = f"--url {self.url}"
        try:
            is_ready = self._ask("ready", None)
        except NoAnswer as e:
            raise BenchError(f"--url {e}") from None
        if not is_ready:
            raise BenchError(
                f"{where}: no Triton server answers there over {self.protocol}; start one with "
                f"`trimode serve REPO` (or check --protocol and the port)"
            )
        for mode in modes:
            if not self._ask("ready", model_name(mode, self.prefix)):
                raise BenchError(
                    f"{where}: the server has no ready model {model_name(mode, self.prefix)!r} for "
                    f"mode {mode.value} (check --prefix, or drop it from --modes)"
                )
        self.slots = self._ask("max_batch_size", f"{self.prefix}engine")

    def _ask(self, what: str, model: str | None):
        """what "ready": is the server (model None) or that model ready -> bool; "max_batch_size" -> int | None.
        Raises NoAnswer when no server of the protocol answers at the URL."""
        from trimode.triton_repo.client import no_answer

        if self.protocol == "grpc":
            try:
                import tritonclient.grpc as grpcclient
                from tritonclient.utils import InferenceServerException
            except ImportError:
                raise MissingDependencyError("tritonclient", "serve") from None
            try:
                with grpcclient.InferenceServerClient(self.url) as c:
                    if what == "ready":
                        return (
                            c.is_model_ready(model, client_timeout=self.timeout_s)
                            if model
                            else c.is_server_ready(client_timeout=self.timeout_s)
                        )
                    return int(c.get_model_config(model, client_timeout=self.timeout_s).config.max_batch_size)
            except (InferenceServerException, ValueError) as e:
                if (failure := no_answer(self.url, "grpc", e)) is not None:
                    raise failure from None
                return None if what != "ready" else False
        path = (
            "/v2/health/ready"
            if model is None
            else f"/v2/models/{model}" + ("/ready" if what == "ready" else "/config")
        )
        try:
            with urllib.request.urlopen(f"http://{self.url}{path}", timeout=self.timeout_s) as response:
                return response.status == 200 if what == "ready" else int(json.loads(response.read())["max_batch_size"])
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError, KeyError) as e:
            if (failure := no_answer(self.url, "http", e)) is not None:
                raise failure from None
            return None if what != "ready" else False

    def stream(self, ask: Ask) -> Iterator[Update]:
        from trimode.triton_repo import client

        inputs = {"text_input": ask.prompt, "max_tokens": ask.max_tokens, "temperature": 0.0}
        inputs |= {"end_id": -1} if ask.ignore_eos else {}
        inputs |= {"block_length": ask.block_length} if ask.block_length and ask.mode is not Mode.AR else {}
        model = client.model_name(ask.mode, self.prefix)
        responses = (
            client.stream_grpc(self.url, model, inputs)
            if self.protocol == "grpc"
            else client.stream_http(self.url, model, inputs)
        )
        for r in responses:
            yield _update(r, bool(r["finish_reason"]))

    def close(self) -> None:
        pass


def served_pass_seconds(metrics_url: str | None, prefix: str, wait_s: float = 2.0) -> float | None:
    """A server's trimode_pass_seconds_total (its engine model's time inside passes) from its metrics
    endpoint (HOST:PORT); None without one. The engine adds to it when it goes idle, then sets its
    occupancy to 0 (metrics.py): wait for that, so the passes of requests just answered are in."""
    if metrics_url is None:
        return None
    import time

    deadline = time.monotonic() + wait_s
    while True:
        try:
            with urllib.request.urlopen(f"http://{metrics_url}/metrics", timeout=10) as response:
                lines = response.read().decode().splitlines()
        except (urllib.error.URLError, OSError) as e:
            raise BenchError(f"--metrics-url {metrics_url}: no metrics there ({getattr(e, 'reason', e)})") from None
        model = f'model="{prefix}engine"'
        values = {
            line.split("{", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in lines
            if model in line and (line.startswith("trimode_pass_seconds_total") or 'mode="all"' in line)
        }
        idle = values.get("trimode_batch_occupancy", 0.0) == 0
        if idle or time.monotonic() > deadline:
            return values.get("trimode_pass_seconds_total", 0.0)
        time.sleep(0.02)
