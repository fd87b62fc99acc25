"""Log probabilities of the emitted tokens (TensorRT-LLM's output_log_probs, OpenAI's logprobs).

A token's log prob is log_softmax of the raw fp32 logits (temperature 1, no sampling transform) of
the pass that produced it, at that token: AR's decode pass (the prefill's last logit for the first
token), self-speculation's verify pass, diffusion's committing denoise pass (the refresh pass's
last logit for the seed). The top-k alternatives are the k most likely tokens other than the mask
token, which is never a candidate (spec §10); every value is normalised over the whole vocabulary.

Computed on the device next to the picks and brought to the host in the same `Batch.fetch`, so a
step keeps its one host sync; nothing is computed when no sequence of the batch asks for them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

MAX_LOGPROBS = 20  # OpenAI's top_logprobs limit

TokenLogProb = tuple[float, list[tuple[int, float]]]  # on the host: (log prob, top-k (token id, log prob))


class LogProbs(NamedTuple):
    """The log probs of the tokens of a [b, L] chunk, on the device."""

    token: torch.Tensor  # [b, L] fp32: of the token at each position
    top_ids: torch.Tensor  # [b, L, k] int64: the k most likely tokens, most likely first
    top_values: torch.Tensor  # [b, L, k] fp32: their log probs

    @property
    def num_top(self) -> int:
        return self.top_ids.shape[-1]

    def where(self, is_new: torch.Tensor, new: "LogProbs") -> "LogProbs":
        """`new` at the positions is_new [b, L], these elsewhere."""
        return LogProbs(
            torch.where(is_new, new.token, self.token),
            torch.where(is_new[..., None], new.top_ids, self.top_ids),
            torch.where(is_new[..., None], new.top_values, self.top_values),
        )

    def rows(self, index: list[int]) -> "LogProbs":
        return LogProbs(self.token[index], self.top_ids[index], self.top_values[index])

    def set_rows(self, index: list[int], value: "LogProbs") -> None:
        self.token[index], self.top_ids[index], self.top_values[index] = value


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, num_top: int, mask_token_id: int) -> LogProbs:
    """log_softmax(logits) at tokens, and the num_top best other than the mask token.
    logits [b, L, V] fp32, tokens [b, L] int64. As logit - logsumexp: no [b, L, V] copy."""
    logits = logits.float()
    norm = torch.logsumexp(logits, dim=-1)  # [b, L]
    token = logits.gather(-1, tokens[..., None])[..., 0] - norm
    if not num_top:
        empty = token.new_empty((*token.shape, 0))
        return LogProbs(token, empty.long(), empty)
    # one more than asked, then the mask token (if among them) moved last: sorts [b, L, k+1], not the vocabulary
    values, ids = logits.topk(min(num_top + 1, logits.shape[-1]), dim=-1)
    order = (ids == mask_token_id).long().argsort(dim=-1, stable=True)[..., :num_top]
    return LogProbs(token, ids.gather(-1, order), values.gather(-1, order) - norm[..., None])


def empty_logprobs(shape: tuple[int, ...], num_top: int, device: torch.device) -> LogProbs:
    """Placeholders for a chunk whose positions are filled pass by pass (diffusion's denoising)."""
    return LogProbs(
        torch.zeros(shape, device=device),
        torch.zeros((*shape, num_top), dtype=torch.long, device=device),
        torch.zeros((*shape, num_top), device=device),
    )


def host_rows(token: list, top_ids: list, top_values: list) -> list[list[TokenLogProb]]:
    """The fetched [b, L] / [b, L, k] lists as per-row, per-token (log prob, top-k pairs)."""
    return [
        [(lp, list(zip(i, v))) for lp, i, v in zip(row_lp, row_i, row_v)]
        for row_lp, row_i, row_v in zip(token, top_ids, top_values)
    ]
