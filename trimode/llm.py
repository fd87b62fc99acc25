"""The Python API: `LLM(...).generate(prompts, SamplingParams(...))`, shaped like vLLM's and
TensorRT-LLM's, over the same engine `trimode generate` runs (docs/python-api.md).

    from trimode import LLM, SamplingParams
    llm = LLM()                      # the embedded default checkpoint (trimode/assets/default)
    llm = LLM("CK_DIR")              # an NLD checkpoint dir, or an engine dir built by `trimode build`
    outs = llm.generate(["def f(x):", "import os"], SamplingParams(mode="self-spec", max_tokens=16))
    outs[0].text, outs[0].token_ids, outs[0].finish_reason, outs[0].stats   # per prompt, in order
    llm.generate("def f(x):", SamplingParams(logprobs=2))[0].top_logprobs   # per token: [(id, log prob)] x 2
    llm.generate("one prompt")       # a str is one prompt; still returns a list
    for text in llm.stream("def f(x):", SamplingParams(max_tokens=32)):  # text as it becomes final
        print(text, end="")
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trimode import EMBEDDED_CHECKPOINT
from trimode.checkpoint import Checkpoint, load_checkpoint
from trimode.config import check_device
from trimode.decoding import Engine, GenerationSettings, Sequence, engine_for
from trimode.decoding.logprobs import MAX_LOGPROBS
from trimode.decoding.settings import MAX_SEED
from trimode.errors import InputError
from trimode.passes import Mode
from trimode.tokenizer import IncrementalDetokenizer, check_text

MAX_BLOCK_LENGTH = 65536  # as the CLI's --block-length


@dataclass(frozen=True)
class SamplingParams:
    """How to generate, for every prompt of one call; validated on construction (InputError names the
    parameter). The fields are `trimode generate`'s options: max_tokens is --max-new-tokens.

    block_length: None = the checkpoint's block_size (an engine dir: its default block length).
    threshold: the commit threshold in [0, 1] (None: diffusion 0.9, self-spec draft 0 = one pass
    fills the block), or "none": diffusion commits an even top-k split per step.
    prefill_chunk: prompt tokens per prefill pass (None: one pass); an engine dir fixes its own.
    logprobs: None = none; 0 = each generated token's log prob (RequestOutput.logprobs); k in 1..20 =
    also the k most likely tokens at each position (RequestOutput.top_logprobs). A log prob is
    log_softmax of the raw logits (temperature 1) of the pass that produced the token.
    """

    mode: str = "ar"
    max_tokens: int = 64
    temperature: float = 0.0
    seed: int = 0
    block_length: int | None = None
    threshold: float | str | None = None
    ignore_eos: bool = False
    prefill_chunk: int | None = None
    logprobs: int | None = None

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "mode", Mode(self.mode).value)
        except ValueError:
            raise InputError(f"mode: expected one of {', '.join(m.value for m in Mode)}, got {self.mode!r}") from None
        _check(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", "an integer >= 1", self.max_tokens)
        _check(
            _is_number(self.temperature) and 0 <= self.temperature < math.inf,
            "temperature",
            "a finite number >= 0",
            self.temperature,
        )
        _check(_is_int(self.seed) and 0 <= self.seed <= MAX_SEED, "seed", f"an integer in 0..{MAX_SEED}", self.seed)
        _check(
            self.block_length is None or _is_int(self.block_length) and 1 <= self.block_length <= MAX_BLOCK_LENGTH,
            "block_length",
            f"an integer in 1..{MAX_BLOCK_LENGTH} or None",
            self.block_length,
        )
        if isinstance(self.threshold, str) and self.threshold.lower() == "none":
            object.__setattr__(self, "threshold", "none")
        t = self.threshold
        _check(
            t is None or t == "none" or isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= t <= 1,
            "threshold",
            "a number in [0, 1], 'none' or None",
            t,
        )
        _check(isinstance(self.ignore_eos, bool), "ignore_eos", "True or False", self.ignore_eos)
        _check(
            self.prefill_chunk is None or _is_int(self.prefill_chunk) and self.prefill_chunk >= 1,
            "prefill_chunk",
            "an integer >= 1 or None",
            self.prefill_chunk,
        )
        _check(
            self.logprobs is None or _is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS,
            "logprobs",
            f"an integer in 0..{MAX_LOGPROBS} or None",
            self.logprobs,
        )

    def to_settings(self) -> GenerationSettings:
        """The GenerationSettings of `trimode generate` with the same options."""
        threshold = None if isinstance(self.threshold, str) else self.threshold  # "none": the top-k schedule
        return GenerationSettings(
            mode=Mode(self.mode),
            max_new_tokens=self.max_tokens,
            temperature=float(self.temperature),
            seed=self.seed,
            block_length=self.block_length,
            threshold=threshold,
            use_top_k_schedule=self.threshold == "none",
            prefill_chunk=self.prefill_chunk,
            ignore_eos=self.ignore_eos,
            logprobs=self.logprobs,
        )


@dataclass
class RequestOutput:
    """One prompt's result. finish_reason: "eos" or "length"; stats: SequenceStats.to_dict() (every
    forward pass counted, prefill included; self-spec's accepted lengths per cycle). With
    SamplingParams.logprobs set: logprobs, one per token id; with logprobs >= 1: top_logprobs, per
    token id its k most likely (token id, log prob), most likely first (else both are empty)."""

    prompt: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stats: dict
    block_length: int  # as run: the requested one, capped at max_tokens where the engine allows
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)


class LLM:
    """A loaded model: an NLD checkpoint (eager) or an engine dir built by `trimode build`.

    model: a checkpoint dir or engine dir (its manifest.json says "stage": "build"); None = the
    embedded default checkpoint. device: "cpu", "cuda" or "cuda:N"; None = cuda if available, else
    cpu (an engine dir: the device it was built for).
    """

    def __init__(self, model: str | Path | None = None, device: str | None = None):
        self.built = None  # the BuiltEngine of an engine dir
        if model is None:
            if not (EMBEDDED_CHECKPOINT / "config.json").is_file():
                raise InputError(
                    "model: no embedded default checkpoint in this build; pass a checkpoint dir "
                    "(make one with: trimode make-checkpoint --random --out DIR)"
                )
            model = EMBEDDED_CHECKPOINT
        model = Path(model)
        if device is not None:
            try:
                check_device(device)
            except InputError as e:
                raise InputError(f"device: {e}") from None
        if _is_engine_dir(model):
            from trimode.builder.engine_dir import load_engine

            self.built = load_engine(model, device)
            self.checkpoint: Checkpoint = self.built.checkpoint
        else:
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            self.checkpoint = load_checkpoint(model, device=device)
        self.tokenizer = self.checkpoint.tokenizer

    @property
    def device(self) -> torch.device:
        return self.checkpoint.model.device

    def generate(
        self,
        prompts: str | list[str],
        params: SamplingParams | None = None,
        on_step: Callable[[dict[int, list[int]]], None] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt as one batch (sequences finish independently) -> one
        RequestOutput per prompt, in order. A str is one prompt. on_step, after each engine step:
        prompt index -> the tokens that prompt emitted in that step (absent: none)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        engine, encoded, seqs = self._start(prompts, params or SamplingParams())
        index = {seq.id: i for i, seq in enumerate(seqs)}
        while engine.has_work:
            new = engine.step()
            if on_step is not None:
                on_step({index[i]: tokens for i, tokens in new.items() if tokens})
        return [
            RequestOutput(
                p,
                ids,
                self.tokenizer.decode(s.tokens),
                list(s.tokens),
                s.finish_reason,
                s.stats.to_dict(),
                s.block_length,
                list(s.logprobs),
                list(s.top_logprobs),
            )
            for p, ids, s in zip(prompts, encoded, seqs)
        ]

    def stream(self, prompt: str, params: SamplingParams | None = None) -> Iterator[str]:
        """Generate for one prompt, yielding its text as it becomes final (a character split over
        tokens waits for its last byte); the pieces concatenate to generate()'s text."""
        engine, _, (seq,) = self._start([prompt], params or SamplingParams())  # bad input raises here

        def pieces() -> Iterator[str]:
            detokenizer, shown = IncrementalDetokenizer(self.tokenizer.decode), 0
            while engine.has_work:
                engine.step()
                text = detokenizer.push(seq.tokens[shown:])
                shown = len(seq.tokens)
                if text:
                    yield text
            if text := detokenizer.flush():
                yield text

        return pieces()

    def _start(self, prompts: list[str], params: SamplingParams) -> tuple[Engine, list[list[int]], list[Sequence]]:
        """Check and encode the prompts, queue them on a new engine (a built engine dir's, or one
        sized for them): what `trimode generate` does before its step loop."""
        if not isinstance(params, SamplingParams):
            raise InputError(f"params: expected a trimode.SamplingParams, got {type(params).__name__}")
        if not prompts:
            raise InputError("prompts: no prompts given")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise InputError(f"prompts[{i}]: expected a str, got {p!r}")
            check_text(p, f"prompts[{i}]")
        if self.built is not None:
            if params.prefill_chunk is not None:
                raise InputError(
                    "prefill_chunk: an engine dir fixes its prefill chunk at build time "
                    f"({self.built.config.prefill_chunk}); leave it None"
                )
        settings = params.to_settings()
        encoded = [self.tokenizer.encode(p) for p in prompts]
        engine = self.built.new_engine() if self.built else engine_for(self.checkpoint.model, encoded, settings)
        return engine, encoded, [engine.add(p, settings.sampling, settings.decoding) for p in encoded]


def _is_engine_dir(path: Path) -> bool:
    """An engine dir's manifest.json says "stage": "build" (load_engine checks the rest)."""
    try:
        return json.loads((path / "manifest.json").read_text()).get("stage") == "build"
    except (OSError, ValueError, AttributeError):
        return False


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(ok: bool, name: str, expected: str, value: object) -> None:
    if not ok:
        raise InputError(f"{name}: expected {expected}, got {value!r}")
