"""The three decoders, written once against the one-forward contract (design.md)."""

from __future__ import annotations

from trimode.decoding.ar import ARDecoder
from trimode.decoding.base import Decoder, SequenceResult, SequenceStats
from trimode.decoding.diffusion import DiffusionDecoder
from trimode.decoding.self_spec import SelfSpecDecoder
from trimode.decoding.settings import GenerationSettings, Mode
from trimode.model import NLDModel

DECODERS: dict[Mode, type[Decoder]] = {
    Mode.AR: ARDecoder, Mode.DIFFUSION: DiffusionDecoder, Mode.SELF_SPEC: SelfSpecDecoder,
}


def make_decoder(model: NLDModel, prompts: list[list[int]], settings: GenerationSettings) -> Decoder:
    return DECODERS[settings.mode](model, prompts, settings)


def generate(model: NLDModel, prompts: list[list[int]], settings: GenerationSettings) -> list[SequenceResult]:
    return make_decoder(model, prompts, settings).run()


__all__ = ["Decoder", "GenerationSettings", "Mode", "SequenceResult", "SequenceStats", "generate", "make_decoder"]
