"""Held-out evaluation of one checkpoint in all three modes.

Perplexity (AR, causal) over the held-out standard-library modules; then greedy generation from
held-out prompts in each mode: tokens per forward pass (every pass counted), self-speculation's mean
accepted length per cycle at several block lengths, tokens/s, and diffusion's agreement with AR.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from trimode.checkpoint import Checkpoint
from trimode.decoding import GenerationSettings, Mode, Sequence, generate
from trimode.errors import InputError
from trimode.passes import PassKind


@dataclass(frozen=True)
class EvalSettings:
    num_prompts: int = 16
    prompt_len: int = 64
    max_new_tokens: int = 64
    block_lengths: tuple[int, ...] = (4, 8, 16, 32)
    batch_size: int = 1  # concurrency 1: where diffusion and self-spec pay off (spec §8)
    ppl_seq_len: int = 256
    ppl_max_windows: int | None = None


def held_out_stream(ck: Checkpoint) -> torch.Tensor:
    from trimode.training.corpus import document_stream, read_texts, split_files

    docs = ck.tokenizer.encode_batch_plain(read_texts(split_files()[1]))
    return document_stream(docs, ck.spec.bos_token_id, ck.spec.eos_token_ids[0])


def held_out_prompts(stream: torch.Tensor, num_prompts: int, prompt_len: int) -> list[list[int]]:
    """Evenly spaced windows of the held-out stream: fixed, so every run sees the same prompts."""
    step = (len(stream) - prompt_len) // num_prompts
    return [stream[i * step : i * step + prompt_len].tolist() for i in range(num_prompts)]


@torch.no_grad()
def perplexity(
    ck: Checkpoint, stream: torch.Tensor, seq_len: int, max_windows: int | None = None, batch_size: int = 8
) -> float:
    """exp(mean next-token cross-entropy) over non-overlapping windows of the stream."""
    windows = stream[: len(stream) // seq_len * seq_len].view(-1, seq_len)[:max_windows]
    total, count = 0.0, 0
    for batch in windows.split(batch_size):
        logits = ck.model(batch, ck.model.new_cache(len(batch), seq_len), PassKind.PREFILL)
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        total, count = total + ce.item(), count + batch[:, 1:].numel()
    return math.exp(total / count)


def run_mode(
    ck: Checkpoint, prompts: list[list[int]], settings: GenerationSettings, batch_size: int, new_engine=None
) -> tuple[list[Sequence], float]:
    """new_engine: makes the Engine of a built engine dir (None: the eager model, sized per batch)."""
    results, start = [], time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        engine = new_engine() if new_engine else None
        results += generate(ck.model, prompts[i : i + batch_size], settings, engine)
    return results, time.perf_counter() - start


def summarize(results: list[Sequence], elapsed: float) -> dict:
    generated = sum(r.stats.num_generated for r in results)
    accepted = [n for r in results for n in r.stats.accepted_lengths]
    return {
        "tokens_per_pass": round(generated / sum(r.stats.num_passes for r in results), 4),
        "tokens_per_s": round(generated / elapsed, 1),
        "mean_accepted_length": round(sum(accepted) / len(accepted), 4) if accepted else None,
    }


def agreement(results: list[Sequence], reference: list[Sequence]) -> dict:
    """Token agreement position by position, and the mean length of the common prefix."""
    same = total = prefix = 0
    for r, ref in zip(results, reference):
        n = min(len(r.tokens), len(ref.tokens))
        matches = [a == b for a, b in zip(r.tokens[:n], ref.tokens[:n])]
        same, total = same + sum(matches), total + n
        prefix += next((i for i, m in enumerate(matches) if not m), n)
    return {
        "token_agreement": round(same / max(total, 1), 4),
        "mean_common_prefix": round(prefix / max(len(results), 1), 2),
    }


def run_modes(
    ck: Checkpoint, prompts: list[list[int]], settings: EvalSettings, progress=None, new_engine=None
) -> tuple[dict, dict[str, list[Sequence]]]:
    """AR, diffusion, and linear and quadratic self-spec at each block length: -> (statistics by run,
    results by run)."""
    base: dict[str, Any] = dict(max_new_tokens=settings.max_new_tokens, ignore_eos=True)
    runs = [
        ("ar", GenerationSettings(mode=Mode.AR, **base)),
        ("diffusion", GenerationSettings(mode=Mode.DIFFUSION, **base)),
    ]
    runs += [
        (f"{mode.value}/{L}", GenerationSettings(mode=mode, block_length=L, **base))
        for L in settings.block_lengths
        for mode in (Mode.SELF_SPEC, Mode.QUADRATIC)
    ]
    modes, outputs = {}, {}
    for name, gen in runs:
        if progress:
            progress(f"{ck.checkpoint_dir.name}: {name}")
        results, elapsed = run_mode(ck, prompts, gen, settings.batch_size, new_engine)
        modes[name], outputs[name] = summarize(results, elapsed), results
        if name != "ar":
            modes[name].update(agreement(results, outputs["ar"]))
    return modes, outputs


def evaluate(
    ck: Checkpoint,
    settings: EvalSettings = EvalSettings(),
    against: Checkpoint | None = None,
    progress=None,
    new_engine=None,
) -> dict:
    """The report of ck; with `against`, the same for the other checkpoint and the per-mode greedy token
    agreement between the two (e.g. FP8 vs bf16), on the same prompts. new_engine: generate through
    a built engine (its Engine factory); perplexity stays the eager model's."""
    stream = held_out_stream(ck)
    prompts = held_out_prompts(stream, settings.num_prompts, settings.prompt_len)
    ppl = perplexity(ck, stream, settings.ppl_seq_len, settings.ppl_max_windows)
    modes, outputs = run_modes(ck, prompts, settings, progress, new_engine)
    report: dict = {
        "checkpoint": str(ck.checkpoint_dir),
        "draft_adapter": ck.model.has_draft_adapter,
        "settings": asdict(settings),
        "num_held_out_tokens": len(stream),
        "perplexity": round(ppl, 4),
        "modes": modes,
        "self_spec_equals_ar": all(
            modes[f"{mode}/{L}"]["token_agreement"] == 1.0
            for L in settings.block_lengths
            for mode in (Mode.SELF_SPEC.value, Mode.QUADRATIC.value)
        ),
    }
    if against is not None:
        if against.tokenizer.vocab() != ck.tokenizer.vocab():
            raise InputError(f"{against.checkpoint_dir}: its tokenizer differs from {ck.checkpoint_dir}'s")
        other_ppl = perplexity(against, stream, settings.ppl_seq_len, settings.ppl_max_windows)
        other_modes, other_outputs = run_modes(against, prompts, settings, progress)
        report["against"] = {
            "checkpoint": str(against.checkpoint_dir),
            "draft_adapter": against.model.has_draft_adapter,
            "perplexity": round(other_ppl, 4),
            "perplexity_change": round(ppl / other_ppl - 1, 5),
            "modes": other_modes,
            "agreement": {name: agreement(outputs[name], other_outputs[name]) for name in outputs},
        }
    return report
