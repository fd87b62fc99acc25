"""Pure-torch references for the three hot-path ops: they state the math and are the oracle.

block_attention   attention of a chunk over the cached prefix plus itself (spec §4)
spec_accept       verify tokens and the accepted length of a drafted block (spec §7)
diffusion_commit  candidates, confidences and the commit rule of one denoising step (spec §6)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ChunkLayout:
    """Where a chunk of L tokens per row sits, shared by every layer of one forward pass."""

    lengths: torch.Tensor         # [b] committed prefix per row
    rows: torch.Tensor | None     # [b] cache rows (None = all B rows, in order)
    is_causal: bool
    positions: torch.Tensor       # [b, L] absolute positions lengths + 0..L-1
    span: int                     # keys to read: max(lengths) + L
    mask: torch.Tensor | None     # [b, 1, L, span] True = visible; None when every key is visible

    @classmethod
    def build(cls, lengths: torch.Tensor, rows: torch.Tensor | None, length: int, is_causal: bool) -> "ChunkLayout":
        offsets = torch.arange(length, device=lengths.device)
        positions = lengths[:, None] + offsets
        longest = int(lengths.max())
        span = longest + length
        mask = None
        # Equal prefixes and a block pass (or a single causal token) see every key: no mask needed.
        if int(lengths.min()) != longest or (is_causal and length > 1):
            visible_end = lengths[:, None] + (offsets + 1 if is_causal else length)           # [b, L]
            mask = (torch.arange(span, device=lengths.device) < visible_end[:, :, None])[:, None]
        return cls(lengths, rows, is_causal, positions, span, mask)


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, layout: ChunkLayout) -> torch.Tensor:
    """One layer's attention for a chunk of L tokens per sequence.

    q [b, L, H, D]; k, v [b, L, Hkv, D]; k_cache, v_cache [B, Hkv, S, D] (this layer).
    Writes the chunk's K/V at lengths .. lengths+L-1 (a block pass's K/V stays scratch: the
    caller does not advance lengths, and the next causal pass over those positions overwrites it).
    Query i sees the prefix and chunk keys 0..i (causal) or the whole chunk (block). -> [b, L, H, D]
    """
    rows, span = layout.rows, layout.span
    row_index = torch.arange(q.shape[0], device=q.device) if rows is None else rows
    k_cache[row_index[:, None], :, layout.positions] = k
    v_cache[row_index[:, None], :, layout.positions] = v
    keys = k_cache[:, :, :span] if rows is None else k_cache[rows, :, :span]
    values = v_cache[:, :, :span] if rows is None else v_cache[rows, :, :span]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), keys, values, attn_mask=layout.mask, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def pick_tokens(logits: torch.Tensor, mask_token_id: int, temperature: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """Argmax over the vocabulary (mask token excluded, spec §10); Gumbel-max in float64 at T > 0."""
    logits = logits.double() if temperature > 0 else logits.clone()
    logits[..., mask_token_id] = float("-inf")
    if temperature > 0:
        u = torch.rand(logits.shape, dtype=torch.float64, generator=generator, device="cpu").to(logits.device)
        gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
        logits = logits / temperature + gumbel
    return logits.argmax(dim=-1)


def spec_accept(verify_logits: torch.Tensor, draft: torch.Tensor, mask_token_id: int,
                temperature: float, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """verify_logits [b, L, V] (causal, index i predicts position i+1), draft [b, L] = [s, d1..d(L-1)].

    a_i = pick(verify logits at i). Accept n = (leading i in 0..L-2 with a_i == d(i+1)) + 1:
    the n-1 matched drafts and one bonus token. -> (a [b, L], n [b]); emit a[:, :n].
    """
    a = pick_tokens(verify_logits, mask_token_id, temperature, generator)
    matches = (a[:, :-1] == draft[:, 1:]).long()
    n = matches.cumprod(dim=1).sum(dim=1) + 1
    return a, n


def diffusion_commit(logits: torch.Tensor, block: torch.Tensor, mask_token_id: int,
                     threshold: float | None, num_commit: torch.Tensor | None,
                     temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """One denoising step. logits [b, L, V] (block pattern: index i predicts position i), block [b, L].

    Candidates x0 = pick(logits); confidence = softmax(logits)[x0] at masked positions.
    With a threshold: commit the most confident masked position always, and every masked
    position with confidence >= threshold. Without: commit the num_commit [b] most confident.
    -> the new block [b, L].
    """
    x0 = pick_tokens(logits, mask_token_id, temperature, generator)
    probs = torch.softmax(logits.float(), dim=-1)
    confidence = probs.gather(-1, x0[..., None])[..., 0]
    is_masked = block == mask_token_id
    confidence = torch.where(is_masked, confidence, torch.tensor(float("-inf"), device=block.device))
    order = confidence.argsort(dim=-1, descending=True, stable=True)
    rank = order.argsort(dim=-1)                                             # 0 = most confident
    if threshold is not None:
        commit = (rank == 0) | (confidence >= threshold)
    else:
        assert num_commit is not None
        commit = rank < num_commit[:, None]
    commit &= is_masked
    return torch.where(commit, x0, block)
