"""Loading an engine dir: check it, load its checkpoint and programs, re-run its self-test.

    engine_dir/
      manifest.json          what was built, with what, for which device (builder/manifest.py)
      checkpoint/            the input checkpoint's files: config, tokenizer, weights (stored once)
      programs/ | onnx/ ...  the backend's files

`load_engine(engine_dir)` refuses (EngineError, one line) an engine dir that was edited after its
build, built with other library versions or for another device, or whose self-test no longer
gives the recorded tokens. It returns a `BuiltEngine`: `new_engine()` gives an `Engine` whose
passes run on the compiled backend.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from trimode.builder.manifest import (
    STEP_TIMES,
    check_manifest,
    is_step_table,
    read_manifest,
    step_table_expected,
)
from trimode.builder.pass_graphs import buckets
from trimode.checkpoint import Checkpoint, load_checkpoint
from trimode.decoding import DecodeConfig, Engine, EngineConfig, GenerationSettings, Mode, SamplingParams
from trimode.decoding.auto import choice_name, choices
from trimode.decoding.engine import default_block_length
from trimode.decoding.step_times import MIN_STEPS, merge
from trimode.errors import EngineError
from trimode.kv_cache import check_pool_fits
from trimode.passes import MODE_PASSES, PassKind, cycle_positions
from trimode.triton_repo.settings import DEFAULT_ENGINE_THREADS

CHECKPOINT_DIR = "checkpoint"
SELF_TEST_PROMPTS = ("def main():\n    ", "import os\nimport sys\n")
SELF_TEST_SOLO_STEPS = 3  # engine steps each prompt runs before the next one joins
SELF_TEST_TOKENS = 12
AUTO_PRIOR_TOKENS = 16  # tokens per request of each timed run of auto_prior


def backend_module(name: str):
    return importlib.import_module(f"trimode.builder.{name}_backend")


@dataclass
class BuiltEngine:
    path: Path
    manifest: dict
    checkpoint: Checkpoint
    backend: object  # the runner backend (decoding/runner.py)
    saved_step_times: dict | None = None  # STEP_TIMES' (read_step_times)

    @property
    def config(self) -> EngineConfig:
        s = self.manifest["settings"]
        return EngineConfig(
            s["max_batch_size"],
            s["max_seq_len"],
            s["max_input_len"],
            kv_block_size=s["kv_block_size"],
            num_kv_blocks=s["num_kv_blocks"],
        )

    @property
    def block_lengths(self) -> tuple[int, ...]:
        return tuple(self.manifest["settings"]["block_lengths"])

    @property
    def default_block_length(self) -> int:
        """What a request that names no block length runs (decoding/engine.py default_block_length)."""
        return default_block_length(self.checkpoint.spec, self.block_lengths)

    @property
    def step_times(self) -> dict | None:
        """Auto's step times, {choice name: {batch size: seconds}}: measured by `trimode bench
        --save-step-times` where it was, else at the build (None: neither, an --onnx-only build)."""
        return self.saved_step_times or self.manifest.get("auto", {}).get("seconds")

    def new_engine(self) -> Engine:
        engine = Engine(self.checkpoint.model, self.config, backend=self.backend, block_lengths=self.block_lengths)
        if self.step_times:
            engine.auto.seed(self.step_times)
        return engine


def check_pool(model, num_blocks: int, block_size: int) -> None:
    """Refuse, before a program is compiled or loaded, the engine's KV pool where this device cannot
    hold it (allocating it checks again; this is the check before the costly work)."""
    check_pool_fits(model.spec, num_blocks, block_size, model.kv_dtype, model.device)


def self_test(model, tokenizer, backend, config: EngineConfig, block_length: int) -> dict[str, list[list[int]]]:
    """The first tokens each mode emits on fixed prompts at temperature 0. The first prompt runs alone
    for its first steps and the next joins it, so that both a one-row batch (which a backend may run
    with programs of its own: torch_backend's batch-1 programs) and a batch of rows are checked.
    A mode that runs the quadratic pass is left out where one cycle of it (W(W+1) positions) does not
    fit max_seq_len after the prompts, as the engine would refuse its requests (block length 32 needs
    1056); so is it from the manifest's check (manifest.check_fields)."""
    prompts = [tokenizer.encode(p) for p in SELF_TEST_PROMPTS]
    longest = max(len(p) for p in prompts) + SELF_TEST_TOKENS
    result = {}
    for mode in Mode:
        fits = longest + cycle_positions(mode, block_length) <= config.max_seq_len
        if PassKind.QUADRATIC in MODE_PASSES[mode] and not fits:
            continue
        settings = GenerationSettings(
            mode=mode, max_new_tokens=SELF_TEST_TOKENS, block_length=block_length, ignore_eos=True
        )
        engine = Engine(model, config, backend=backend, block_lengths=(block_length,))
        seqs = []
        for p in prompts:
            seqs.append(engine.add(p, settings.sampling, settings.decoding))
            for _ in range(SELF_TEST_SOLO_STEPS):
                if engine.has_work:
                    engine.step()
        while engine.has_work:
            engine.step()
        result[mode.value] = [seq.tokens for seq in seqs]
    return result


def auto_prior(model, tokenizer, backend, config: EngineConfig, block_lengths: tuple[int, ...]) -> dict:
    """What `auto` starts from on this engine (AutoPolicy.seed, the manifest's `auto`): the median
    seconds of an engine step of each choice it makes (AR, and each speculative mode at each block
    length), at each batch bucket (1, 2, 4, .. max_batch_size copies of the first self-test prompt).
    The steps are synchronous, as auto's own are. Not acceptance: that is the requests' (a short fixed
    prompt gave 1.4 where held-out code gives 3), and a low prior would keep auto from ever trying a
    speculative mode. Timed on the torch threads an engine serves with (DEFAULT_ENGINE_THREADS): at
    the build's default (2 on a 2-core CPU) a self-spec/8 step took 3.4 ms where served it took 7, and
    the ratio of AR's times that auto scales build times by (1.3x) does not carry to block passes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(DEFAULT_ENGINE_THREADS)
    try:
        return {"seconds": _step_seconds(model, tokenizer, backend, config, block_lengths)}
    finally:
        torch.set_num_threads(threads)


def _step_seconds(model, tokenizer, backend, config: EngineConfig, block_lengths: tuple[int, ...]) -> dict:
    prompt = tokenizer.encode(SELF_TEST_PROMPTS[0])
    config = dataclasses.replace(config, async_steps=False)
    seconds: dict[str, dict[str, float]] = {}
    for mode, width in choices(block_lengths):
        if len(prompt) + AUTO_PRIOR_TOKENS + cycle_positions(mode, width) > config.max_seq_len:
            continue
        by_size = seconds[choice_name((mode, width))] = {}
        for size in buckets(config.max_slots):
            engine = Engine(model, config, backend=backend, block_lengths=block_lengths)
            params = SamplingParams(AUTO_PRIOR_TOKENS, ignore_eos=True)
            for _ in range(size):
                engine.add(prompt, params, DecodeConfig(mode, width or None))
            engine.step()  # the prefill
            steps = []
            while engine.has_work:
                began = time.perf_counter()
                engine.step()
                steps.append(time.perf_counter() - began)
            by_size[str(size)] = statistics.median(steps)
    return seconds


def load_engine(engine_dir: Path, device: str | torch.device | None = None) -> BuiltEngine:
    engine_dir = Path(engine_dir)
    manifest = read_manifest(engine_dir)
    device = torch.device(device or manifest["settings"]["device"])
    check_manifest(engine_dir, manifest, device)
    saved = read_step_times(engine_dir, manifest)
    module = backend_module(manifest["settings"]["backend"])
    ck = load_checkpoint(engine_dir / CHECKPOINT_DIR, device=device, dtype=getattr(module, "MODEL_DTYPE", None))
    s = manifest["settings"]
    check_pool(ck.model, s["num_kv_blocks"], min(s["kv_block_size"], s["max_seq_len"]))
    backend = module.load(engine_dir, ck.model, manifest["backend"])
    built = BuiltEngine(engine_dir, manifest, ck, backend, saved and saved["seconds"])
    got = self_test(ck.model, ck.tokenizer, backend, built.config, built.block_lengths[0])
    recorded = manifest["self_test"]["tokens"]
    for mode in sorted(set(recorded) | set(got)):
        if got.get(mode) != recorded.get(mode):
            raise EngineError(
                f"{engine_dir}: the {mode} self-test gives other tokens than at build time; "
                f"rebuild the engine on this machine"
            )
    return built


def read_step_times(engine_dir: Path, manifest: dict) -> dict | None:
    """What `trimode bench --save-step-times` stored with this engine (None: nothing): {"seconds":
    {choice name: {batch size: seconds}}, "measured": {date, machine, ..}, "engine_digest"}. Refused,
    in one line, where unreadable or measured on another build of it."""
    path = engine_dir / STEP_TIMES
    if not path.is_file():
        return None
    again = (
        f"delete the file (auto then starts from the build's times), then measure them again if wanted with "
        f"`trimode bench --engine {engine_dir} --save-step-times`"
    )
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise EngineError(f"{path}: unreadable ({type(e).__name__}); {again}") from None
    if not isinstance(saved, dict) or saved.get("engine_digest") != manifest["digest_sha256"]:
        raise EngineError(f"{path}: not measured on this build of the engine; {again}")
    lengths, slots = manifest["settings"]["block_lengths"], manifest["settings"]["max_batch_size"]
    seconds = saved.get("seconds")
    if not is_step_table(seconds, lengths) or "ar" not in seconds:
        raise EngineError(f"{path}: seconds: expected {step_table_expected(lengths)}, AR's among them; {again}")
    if any(int(size) > slots for by_size in seconds.values() for size in by_size):
        raise EngineError(f"{path}: a batch size above the engine's {slots} slots; {again}")
    return saved


def save_step_times(built: BuiltEngine, measured: dict, about: dict) -> Path:
    """Store measured ({choice name: {batch size: seconds}}, AR's among them: step_times.StepTimes)
    with the engine, for every engine loaded from it to start auto from; the choices and batch
    sizes it lacks keep their earlier times (saved before, else the build's), scaled as AR's
    (step_times.merge). about: what measured them (machine, threads, date). Written whole, then
    renamed over the last: a server loading the engine meanwhile reads the one or the other."""
    if "ar" not in measured:
        raise EngineError(
            f"too few AR steps to time (fewer than {MIN_STEPS} at every batch size): nothing saved in "
            f"{built.path / STEP_TIMES}; bench AR with more requests or tokens"
        )
    earlier = built.step_times
    seconds = merge(measured, earlier) if earlier else measured
    saved = {
        "engine_digest": built.manifest["digest_sha256"],
        "measured": {**about, "choices": sorted(measured)},
        "seconds": seconds,
    }
    path, part = built.path / STEP_TIMES, built.path / f".{STEP_TIMES}.{os.getpid()}.part"  # two saves at once
    try:
        part.write_text(json.dumps(saved, indent=1) + "\n", encoding="utf-8")
        os.replace(part, path)
    except OSError as e:
        part.unlink(missing_ok=True)
        raise EngineError(f"{path}: cannot write it ({e.strerror or e}): step times not saved") from None
    built.saved_step_times = seconds
    return path
