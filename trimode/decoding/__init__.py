"""The decoding engine (design.md "Engine: who owns what"): sequences, a scheduler, a model
runner, and the three mode policies written once against the one-forward contract."""

from __future__ import annotations

from trimode.decoding.engine import Engine, check_positions, resolve_block_length
from trimode.decoding.sequence import Sequence, SequenceStats
from trimode.decoding.settings import DecodeConfig, EngineConfig, GenerationSettings, SamplingParams
from trimode.errors import InputError
from trimode.model import NLDModel
from trimode.passes import Mode, PassKind, cycle_positions


def engine_for(model: NLDModel, prompts: list[list[int]], settings: GenerationSettings) -> Engine:
    """An engine sized for this batch of prompts: one slot each, room for the longest."""
    if not prompts:
        raise InputError("no prompts given")
    check_positions(model.spec, max(len(p) for p in prompts), settings.max_new_tokens)  # before allocating
    block_length = resolve_block_length(model.spec, settings.decoding, settings.sampling)
    cycle = cycle_positions(settings.decoding.mode, block_length)
    max_seq_len = max(len(p) for p in prompts) + settings.max_new_tokens + cycle
    return Engine(model, EngineConfig(len(prompts), max_seq_len, settings.prefill_chunk))


def generate(
    model: NLDModel, prompts: list[list[int]], settings: GenerationSettings, engine: Engine | None = None
) -> list[Sequence]:
    """Add every prompt, step until all are done: -> the finished sequences, in prompt order.
    engine: an idle engine to run on (a built engine dir's); None = one sized for these prompts."""
    engine = engine or engine_for(model, prompts, settings)
    seqs = [engine.add(p, settings.sampling, settings.decoding) for p in prompts]
    while engine.has_work:
        engine.step()
    return seqs


__all__ = [
    "DecodeConfig",
    "Engine",
    "EngineConfig",
    "GenerationSettings",
    "Mode",
    "PassKind",
    "SamplingParams",
    "Sequence",
    "SequenceStats",
    "engine_for",
    "generate",
]
