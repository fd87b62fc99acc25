"""Repository settings: what `trimode repo` writes, validated once (design.md style 7)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from trimode.errors import InputError
from trimode.passes import Mode

# A model name is a folder name and part of every URL a client calls.
_NAME = re.compile(r"[A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class RepoSettings:
    prefix: str = ""  # prepended to every model name ("nld_" -> nld_ar, nld_engine, ...)
    modes: tuple[Mode, ...] = tuple(Mode)  # one ensemble per mode
    max_batch_size: int | None = None  # Triton's max_batch_size; None = the engine's
    instances: int = 1  # pre- and post-processing instances (the engine model is one)
    max_queue_delay_us: int = 0  # the engine model's dynamic batcher
    max_queued_requests: int | None = None  # past it: "overloaded"; None = 8 x the engine's slots
    # Triton's decoupled transaction policy (TensorRT-LLM's decoupled_mode): True streams and takes
    # several prompts a request, but answers only gRPC's streaming RPC and HTTP generate(_stream);
    # False answers plain ModelInfer (and HTTP generate), one whole response a request
    decoupled: bool = True
    # also serve this mode as the model `<prefix>ensemble`: TensorRT-LLM's name, hard-coded in their clients
    ensemble_mode: Mode | None = None
    # the engine model's torch intra-op threads; 0: DEFAULT_ENGINE_THREADS (`trimode serve --threads` overrides)
    threads: int = 0

    def __post_init__(self) -> None:
        _check(
            isinstance(self.prefix, str) and _NAME.fullmatch(self.prefix) is not None,
            "prefix",
            "letters, digits, '_', '-' or '.'",
            self.prefix,
        )
        try:
            modes = tuple(Mode(m) for m in self.modes)
        except ValueError:
            raise InputError(
                f"modes: expected some of {', '.join(m.value for m in Mode)}, got {', '.join(map(str, self.modes))}"
            ) from None
        _check(
            len(modes) >= 1 and len(set(modes)) == len(modes),
            "modes",
            "one or more distinct modes",
            ",".join(m.value for m in modes),
        )
        object.__setattr__(self, "modes", modes)
        _check(isinstance(self.decoupled, bool), "decoupled", "true or false", self.decoupled)
        if self.ensemble_mode is not None:
            _check(
                self.ensemble_mode in [m.value for m in modes],
                "ensemble_mode",
                f"one of the repository's modes ({', '.join(m.value for m in modes)})",
                getattr(self.ensemble_mode, "value", self.ensemble_mode),  # the mode's name, not its repr
            )
            object.__setattr__(self, "ensemble_mode", Mode(self.ensemble_mode))
        for field, low in (
            ("max_batch_size", 1),
            ("instances", 1),
            ("max_queue_delay_us", 0),
            ("max_queued_requests", 1),
            ("threads", 0),
        ):
            value = getattr(self, field)
            _check(
                value is None
                and field in ("max_batch_size", "max_queued_requests")
                or isinstance(value, int)
                and low <= value <= 1 << 30,
                field,
                f"an integer >= {low}",
                value,
            )


# The engine model's torch threads. The server's thread layout: the engine loop runs the passes on this
# many intra-op threads; every other python backend stub (tokenizing pre- and post-processing) and
# every other OpenMP pool in the server gets OMP_NUM_THREADS=1 (server.py). With torch's default (all
# cores) beside the loop thread and the other stubs, served AR ran 2.2x slower than at one thread on a
# 2-core Intel Xeon (issue 25); on the 2-core AMD EPYC: docs/performance.md. GPU engines spend their
# host threads on the step, not the passes. `trimode bench --engine` runs its engine so, and the build
# times auto's steps so (builder/engine_dir.auto_prior).
DEFAULT_ENGINE_THREADS = 1

TRTLLM_ENSEMBLE = "ensemble"  # the model name TensorRT-LLM's ensemble has, and its clients call


def ensemble_name(prefix: str, mode: Mode) -> str:
    """The model a client calls for one mode: ar, diffusion, self_spec (a name, so '_' not '-')."""
    return prefix + mode.value.replace("-", "_")


def _check(ok: bool, field: str, expected: str, value: object) -> None:
    if not ok:
        raise InputError(f"{field}: expected {expected}, got {value!r}")
