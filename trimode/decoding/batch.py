"""The sequences one policy cycle works on, bound to the runner they run on.

A `Batch` is what the mode policies see: it runs counted passes over its sequences' slots, picks,
accepts and commits tokens from a pass's logits with each sequence's own random numbers, commits
tokens to the cache, and brings results to the host in one transfer per call of `fetch` (where a
non-finite logit seen since the last fetch is raised), the emitted tokens' log probs with them
when a sequence asked for them (logprobs.py). When every sequence is greedy and the pass
returned its greedy picks (a compiled engine's do), those are used: the same tokens, no tensor
work on the logits.
"""

from __future__ import annotations

import math

import torch

from trimode.config import ModelSpec
from trimode.decoding.logprobs import LogProbs, host_rows, token_logprobs
from trimode.decoding.runner import ModelRunner, PassOutput
from trimode.decoding.sequence import Sequence
from trimode.errors import NumericalError
from trimode.passes import PassKind
from trimode.plugins.ops import diffusion_commit, spec_accept
from trimode.plugins.reference import Accepted, accept_picks, commit_picks, pick_tokens
from trimode.transfer import to_device


class Batch:
    def __init__(self, runner: ModelRunner, seqs: list[Sequence]):
        self.runner, self.seqs = runner, seqs
        self.slots = [s.held_slot for s in seqs]
        self.spec: ModelSpec = runner.model.spec
        self.device = runner.device
        self._is_finite: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def block_length(self) -> int:
        return self.seqs[0].block_length

    def subset(self, index: list[int]) -> "Batch":
        sub = Batch(self.runner, [self.seqs[i] for i in index])
        sub._is_finite = self._is_finite  # one check for the whole cycle
        return sub

    def run(self, kind: PassKind, tokens: torch.Tensor, logit_index: torch.Tensor | None = None) -> PassOutput:
        """One counted forward pass of `kind` over tokens [b, L] of these sequences."""
        for s in self.seqs:
            s.stats.passes[kind.value] += 1
        out = self.runner.run(kind, tokens, self.slots, logit_index)
        self._is_finite.append(torch.isfinite(out.logits).all() if out.is_finite is None else out.is_finite)
        return out

    def advance(self, counts: list[int]) -> None:
        self.runner.advance(self.slots, counts)

    def next_tokens(self) -> torch.Tensor:
        """[b] each sequence's next token (emitted, not yet cached)."""
        return to_device([s.next_token for s in self.seqs], self.device)

    def sampling(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row (temperature [b] fp32, Philox key [b] int64) for one sampling op: each sequence
        draws from its own stream, whatever else shares the batch."""
        temperature = to_device([s.params.temperature for s in self.seqs], self.device, torch.float32)
        keys = to_device([s.next_rng_key() for s in self.seqs], self.device)
        return temperature, keys

    @property
    def is_greedy(self) -> bool:
        """Every sequence picks at temperature 0 (known on the host: no sync)."""
        return all(s.params.temperature == 0 for s in self.seqs)

    @property
    def num_top_logprobs(self) -> int | None:
        """The most top log probs a sequence asked for; None: none asked for log probs (known on the host)."""
        asked = [s.params.logprobs for s in self.seqs if s.params.logprobs is not None]
        return min(max(asked), self.spec.vocab_size - 1) if asked else None

    def logprobs(self, out: PassOutput, tokens: torch.Tensor, num_top: int | None = None) -> LogProbs | None:
        """The log probs of tokens [b, L] under the pass's logits (num_top: default the batch's);
        None, and no work, when no sequence asked for them."""
        num_top = self.num_top_logprobs if num_top is None else num_top
        if num_top is None:
            return None
        return token_logprobs(out.logits, tokens, num_top, self.spec.mask_token_id)

    def pick(self, out: PassOutput) -> torch.Tensor:
        """-> [b, L] tokens: greedy, or sampled per sequence (mask token never picked)."""
        if out.picks is not None and self.is_greedy:
            return out.picks
        return pick_tokens(out.logits, self.spec.mask_token_id, *self.sampling())

    def accept(self, out: PassOutput, draft: torch.Tensor) -> Accepted:
        """spec_accept of a verify pass over draft [b, L] (EOS is the sequences' rule: emit)."""
        no_eos = torch.empty(0, dtype=torch.long, device=self.device)
        if out.picks is not None and self.is_greedy:
            return accept_picks(out.picks, draft, no_eos)
        return spec_accept(
            out.logits, draft, self.spec.mask_token_id, no_eos, *self.sampling(), kernels=self.runner.kernels
        )

    def commit(
        self, out: PassOutput, block: torch.Tensor, threshold: float | None, num_commit: torch.Tensor | None
    ) -> torch.Tensor:
        """diffusion_commit of a block pass over block [b, L] -> the new block."""
        mask_id = self.spec.mask_token_id
        if threshold == 0 and out.picks is not None and self.is_greedy:  # every mask commits: no ranking needed
            return torch.where(block == mask_id, out.picks, block)
        if out.confidence is not None and out.picks is not None and self.is_greedy:  # both or neither
            return commit_picks(out.picks, out.confidence, block, mask_id, threshold, num_commit)
        return diffusion_commit(
            out.logits, block, mask_id, threshold, num_commit, *self.sampling(), kernels=self.runner.kernels
        )

    def eos_table(self) -> torch.Tensor:
        """[b, E] each sequence's end tokens, padded with -1 (no token id)."""
        width = max(len(s.eos_ids) for s in self.seqs)
        table = [sorted(s.eos_ids) + [-1] * (width - len(s.eos_ids)) for s in self.seqs]
        return to_device(table, self.device).view(len(self.seqs), width)

    def fetch(self, *values: torch.Tensor | LogProbs | None) -> list[list]:
        """The values as host lists, in one device-to-host transfer (the step's host sync): a tensor
        [b, ...] as b nested lists; a LogProbs (or None: none asked) as b lists of TokenLogProb (None)."""
        return self.fetch_later(*values).result()

    def fetch_later(self, *values: torch.Tensor | LogProbs | None) -> "Fetch":
        """fetch, with the transfer started now and waited for at `Fetch.result()` (on CUDA an
        asynchronous copy into pinned memory: the host may launch more passes meanwhile).
        Everything goes over flat, as one 1-D tensor, and is cut into rows on the host: a handful of
        tensor ops whatever is fetched (each costs ~10 us of dispatch, the most of a small step's host)."""
        tensors = [t for v in values if v is not None for t in ((v,) if isinstance(v, torch.Tensor) else v)]
        is_float = any(t.is_floating_point() for t in tensors)  # token ids are exact in float64
        parts = [t.reshape(-1).double() if is_float else t.reshape(-1) for t in tensors]
        num_checks = len(self._is_finite)
        parts += [f.reshape(1) for f in self._is_finite]  # cat promotes them to the values' dtype
        self._is_finite.clear()
        flat = (torch.cat(parts) if len(parts) > 1 else parts[0]) if parts else None
        done = None
        if flat is not None and flat.is_cuda:
            flat = flat.to("cpu", non_blocking=True)  # pinned: the copy runs after the passes, the host goes on
            done = torch.cuda.Event()
            done.record()
        return Fetch(values, tensors, is_float, num_checks, flat, done, len(self.seqs))


class Fetch:
    """A started fetch (Batch.fetch_later): `result()` waits for its transfer once and cuts the rows."""

    def __init__(self, values: tuple, tensors: list, is_float: bool, num_checks: int, flat, done, num_rows: int):
        self.values, self.tensors, self.is_float, self.num_checks = values, tensors, is_float, num_checks
        self.flat, self.done, self.num_rows = flat, done, num_rows
        self._result: list[list] | None = None

    def result(self) -> list[list]:
        """The fetched values as Batch.fetch gives them; raises NumericalError if a pass it checks
        produced a non-finite logit."""
        if self._result is None:
            self._result = self._cut()
        return self._result

    def _cut(self) -> list[list]:
        if self.done is not None:
            self.done.synchronize()
        flat = self.flat.tolist() if self.flat is not None else []
        if self.num_checks and not all(flat[len(flat) - self.num_checks :]):
            raise NumericalError(
                "the model produced non-finite logits (NaN or Inf): check the checkpoint's "
                "weights and config.json values"
            )
        lists, at = [], 0
        for t in self.tensors:
            piece, at = flat[at : at + t.numel()], at + t.numel()
            is_ids = not t.is_floating_point() and self.is_float
            lists.append(_nest(list(map(int, piece)) if is_ids else piece, t.shape))
        rows = iter(lists)
        out: list[list] = []
        for v in self.values:
            if v is None:
                out.append([None] * self.num_rows)
            elif isinstance(v, torch.Tensor):
                out.append(next(rows))
            else:
                out.append(host_rows(next(rows), next(rows), next(rows)))
        return out


def _nest(flat: list, shape: torch.Size) -> list:
    """A row-major flat list as the nested lists of `shape` (what Tensor.tolist gives)."""
    for depth in range(len(shape) - 1, 0, -1):
        size = shape[depth]
        flat = [flat[i * size : (i + 1) * size] for i in range(math.prod(shape[:depth]))]
    return flat
