"""What train-draft trains and measures on (draft.py runs the stage): the text as one token stream,
windows of it continued by the checkpoint's own AR greedy decoding (the targets), held-out prompts,
and the runtime's self-speculative acceptance on them."""

from __future__ import annotations

from pathlib import Path

import torch

from trimode.checkpoint import Checkpoint
from trimode.decoding import GenerationSettings, Mode, generate
from trimode.errors import InputError
from trimode.model import NLDModel


def token_stream(ck: Checkpoint, data: Path | None) -> tuple[torch.Tensor, str]:
    """The training text as one token stream: --data (a file or folder), or the fixture's training files."""
    from trimode.quantize.calibration import TEXT_SUFFIXES
    from trimode.training.corpus import document_stream, read_texts, split_files

    if data is None:
        texts, source = (
            read_texts(split_files()[0]),
            "Python standard library (training files, held-out modules excluded)",
        )
    else:
        data = Path(data)
        if not data.exists():
            raise InputError(f"--data {data}: no such file or folder")
        files = [data] if data.is_file() else sorted(p for p in data.rglob("*") if p.suffix in TEXT_SUFFIXES)
        texts, source = [t for t in read_texts(files, "--data") if t.strip()], str(data)
    stream = document_stream(ck.tokenizer.encode_batch_plain(texts), ck.spec.bos_token_id, ck.spec.eos_token_ids[0])
    return stream, source


class TargetPool:
    """Greedy sequences generated in large batches, handed out a training batch at a time; every window is used once.
    settings: anything with prompt_len, gen_len and gen_batch_size (draft.DraftSettings)."""

    def __init__(self, model: NLDModel, stream: torch.Tensor, settings, generator: torch.Generator):
        self.model, self.stream, self.generator = model, stream, generator
        self.prompt_len, self.gen_len, self.gen_batch_size = (
            settings.prompt_len,
            settings.gen_len,
            settings.gen_batch_size,
        )
        self.buffer: list[torch.Tensor] = []

    def take(self, n: int) -> torch.Tensor:
        while len(self.buffer) < n:
            prompts = sample_prompts(self.stream, max(n, self.gen_batch_size), self.prompt_len, self.generator)
            self.buffer += list(greedy_sequences(self.model, prompts, self.gen_len))
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return torch.stack(out)


def sample_prompts(stream: torch.Tensor, n: int, length: int, generator: torch.Generator) -> list[list[int]]:
    starts = torch.randint(0, len(stream) - length, (n,), generator=generator)
    return [stream[s : s + length].tolist() for s in starts.tolist()]


@torch.no_grad()
def greedy_sequences(model: NLDModel, prompts: list[list[int]], gen_len: int) -> torch.Tensor:
    """[n, prompt_len + gen_len]: each prompt followed by the runtime's own AR greedy continuation."""
    results = generate(model, prompts, GenerationSettings(mode=Mode.AR, max_new_tokens=gen_len, ignore_eos=True))
    return torch.tensor([p + r.tokens for p, r in zip(prompts, results)])


def validation_prompts(ck: Checkpoint, stream: torch.Tensor, settings) -> tuple[torch.Tensor, list]:
    """-> (the training stream, held-out prompts for the acceptance estimate). Default data: windows of
    the held-out modules placed between `trimode eval`'s prompts (so tuning never sees those);
    --data: the last 5% of the user's text is held out. settings: num_eval_prompts, prompt_len, data."""
    n, length = settings.num_eval_prompts, settings.prompt_len
    if n == 0:
        return stream, []
    if settings.data is None:
        from trimode.evaluate import held_out_stream

        held = held_out_stream(ck)
        step = (len(held) - length) // n
        return stream, [held[i * step + step // 2 : i * step + step // 2 + length].tolist() for i in range(n)]
    cut = int(len(stream) * 0.95)
    held, stream = stream[cut:], stream[:cut]
    if len(held) < length + n:
        raise InputError(
            f"--data: too little text to hold out {n} prompts of {length} tokens "
            f"(pass --num-eval-prompts 0, or more text)"
        )
    step = (len(held) - length) // n
    return stream, [held[i * step : i * step + length].tolist() for i in range(n)]


@torch.no_grad()
def held_out_acceptance(
    model: NLDModel,
    prompts: list[list[int]],
    block_lengths: tuple[int, ...],
    modes: tuple[Mode, ...] = (Mode.SELF_SPEC,),
    max_new_tokens: int = 64,
) -> dict[str, float]:
    """Mean accepted tokens per cycle of the runtime's linear and/or quadratic self-speculation, per
    mode and block length, labelled as `trimode eval` labels its runs ("self-spec/8", "quadratic/8")."""
    out = {}
    for mode in modes:
        for L in block_lengths:
            settings = GenerationSettings(mode=mode, block_length=L, max_new_tokens=max_new_tokens, ignore_eos=True)
            accepted = [n for r in generate(model, prompts, settings) for n in r.stats.accepted_lengths]
            out[f"{mode.value}/{L}"] = round(sum(accepted) / len(accepted), 4)
    return out
