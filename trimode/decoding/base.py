"""What every decoder shares: the batch state, prefill, emission rules and statistics.

A decoder is steppable: `prefill()` then `step()` until `done`, each returning the tokens newly
emitted per sequence, so a server can stream them. Sequences finish independently (EOS or
max_new_tokens) and leave the batch's work (spec §10).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from trimode.decoding.settings import GenerationSettings
from trimode.errors import InputError
from trimode.model import NLDModel, Pattern
from trimode.plugins.reference import pick_tokens


@dataclass
class SequenceStats:
    num_generated: int = 0
    passes: Counter = field(default_factory=Counter)     # by kind: prefill, decode, denoise, ...
    accepted_lengths: list[int] = field(default_factory=list)  # self-speculation, per cycle

    @property
    def num_passes(self) -> int:
        return sum(self.passes.values())

    @property
    def tokens_per_pass(self) -> float:
        """Every pass counted, prefill included: AR is exactly 1.0 with a one-shot prefill."""
        return self.num_generated / max(self.num_passes, 1)

    @property
    def mean_accepted_length(self) -> float | None:
        a = self.accepted_lengths
        return sum(a) / len(a) if a else None

    def to_dict(self) -> dict:
        return {"num_generated": self.num_generated, "passes": dict(self.passes),
                "num_passes": self.num_passes, "tokens_per_pass": round(self.tokens_per_pass, 4),
                "accepted_lengths": list(self.accepted_lengths),
                "mean_accepted_length": self.mean_accepted_length}


@dataclass
class SequenceResult:
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "eos" or "length"
    stats: SequenceStats = field(default_factory=SequenceStats)


class Decoder:
    def __init__(self, model: NLDModel, prompts: list[list[int]], settings: GenerationSettings):
        spec = model.spec
        if not prompts:
            raise InputError("no prompts given")
        for i, p in enumerate(prompts):
            if not p:
                raise InputError(f"prompt {i} is empty")
            if min(p) < 0 or max(p) >= spec.vocab_size:
                raise InputError(f"prompt {i}: token ids must lie in [0, {spec.vocab_size})")
        self.model, self.settings, self.spec = model, settings, spec
        self.block_length = settings.block_length or spec.block_size
        self.results = [SequenceResult(list(p)) for p in prompts]
        self.eos_ids = frozenset(() if settings.ignore_eos else (*spec.eos_token_ids, *settings.stop_token_ids))
        max_len = max(len(p) for p in prompts) + settings.max_new_tokens + self.block_length
        if max_len > spec.max_position_embeddings + self.block_length:
            raise InputError(f"prompt + max_new_tokens exceed max_position_embeddings={spec.max_position_embeddings}")
        self.cache = model.new_cache(len(prompts), max_len)
        self.seeds = torch.zeros(len(prompts), dtype=torch.long, device=model.device)  # next token, not cached
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.eos_tensor = torch.tensor(sorted(self.eos_ids), dtype=torch.long, device=model.device)

    # --- shared phases -------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return all(r.finish_reason for r in self.results)

    def active_rows(self) -> torch.Tensor:
        return torch.tensor([i for i, r in enumerate(self.results) if not r.finish_reason],
                            dtype=torch.long, device=self.model.device)

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        return pick_tokens(logits, self.spec.mask_token_id, self.settings.temperature, self.sampling_seed())

    def sampling_seed(self) -> int:
        """A fresh Philox seed for each sampling op at temperature > 0, drawn from settings.seed."""
        if self.settings.temperature <= 0:
            return 0
        return int(torch.randint(0, 2 ** 62, (1,), generator=self.generator))

    def forward(self, tokens: torch.Tensor, rows: torch.Tensor, pattern: Pattern, kind: str,
                use_draft: bool = False, logit_index: torch.Tensor | None = None) -> torch.Tensor:
        """One counted forward pass; rows None when the whole batch runs (no cache gather)."""
        for r in rows.tolist():
            self.results[r].stats.passes[kind] += 1
        whole = len(rows) == len(self.results)
        return self.model(tokens, self.cache, pattern, None if whole else rows, use_draft, logit_index)

    @torch.no_grad()
    def prefill(self) -> list[list[int]]:
        """Causal passes over the prompts (in chunks if asked); the last logit gives each first token."""
        prompts = [r.prompt for r in self.results]
        lengths = torch.tensor([len(p) for p in prompts], device=self.model.device)
        chunk = self.settings.prefill_chunk or int(lengths.max())
        last_logits = torch.empty(len(prompts), self.spec.vocab_size, device=self.model.device)
        for start in range(0, int(lengths.max()), chunk):
            rows = (lengths > start).nonzero()[:, 0]
            counts = (lengths[rows] - start).clamp(max=chunk)
            tokens = torch.full((len(rows), int(counts.max())), self.spec.pad_token_id or 0,
                                dtype=torch.long, device=self.model.device)
            for j, r in enumerate(rows.tolist()):  # ragged prompts: pad; padded K/V stays scratch
                tokens[j, :counts[j]] = torch.tensor(prompts[r][start:start + int(counts[j])])
            logits = self.forward(tokens, rows, Pattern.CAUSAL, "prefill", logit_index=counts - 1)
            self.cache.advance(rows, counts)
            ends = start + counts == lengths[rows]
            last_logits[rows[ends]] = logits[ends, 0]
        self.seeds = self.pick(last_logits)
        return [self.emit(r, [t]) for r, t in enumerate(self.seeds.tolist())]

    def emit(self, row: int, tokens: list[int]) -> list[int]:
        """Append tokens to a sequence, truncated at its first EOS and at max_new_tokens."""
        result = self.results[row]
        if result.finish_reason:
            return []
        room = self.settings.max_new_tokens - len(result.tokens)
        out = tokens[:room]
        eos = [i for i, t in enumerate(out) if t in self.eos_ids]
        if eos:
            out, result.finish_reason = out[:eos[0] + 1], "eos"
        elif len(out) == room:
            result.finish_reason = "length"
        result.tokens += out
        result.stats.num_generated += len(out)
        return out

    def step(self) -> list[list[int]]:
        raise NotImplementedError

    def run(self) -> list[SequenceResult]:
        self.prefill()
        while not self.done:
            self.step()
        return self.results

    def _emit_rows(self, rows: torch.Tensor, tokens: list[list[int]]) -> list[list[int]]:
        new: list[list[int]] = [[] for _ in self.results]
        for r, t in zip(rows.tolist(), tokens):
            new[r] = self.emit(r, t)
        return new
