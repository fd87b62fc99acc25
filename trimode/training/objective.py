"""The joint objective (spec §9): one forward over [noisy copy | clean copy] gives both losses."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trimode.model import NLDModel

EPS = 1e-3


def joint_mask(length: int, block_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[2L, 2L] bool, True = may attend. Rows/cols 0..L-1 are the noisy copy, L..2L-1 the clean one.
    noisy->noisy: same block (bidirectional); noisy->clean: earlier blocks; clean->clean: causal;
    clean->noisy: never."""
    i = torch.arange(length, device=device)
    block = i // block_size
    noisy_noisy = block[:, None] == block[None, :]
    noisy_clean = block[None, :] < block[:, None]
    clean_clean = i[None, :] <= i[:, None]
    top = torch.cat([noisy_noisy, noisy_clean], dim=1)
    bottom = torch.cat([torch.zeros_like(clean_clean), clean_clean], dim=1)
    return torch.cat([top, bottom], dim=0)


def add_noise(
    tokens: torch.Tensor, mask_token_id: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sequence t ~ U(0,1), p = (1-eps) t + eps; each token masked with probability p.
    -> (noisy [B, L], is_masked [B, L], p [B])."""
    b, length = tokens.shape
    t = torch.rand(b, generator=generator)
    p = ((1 - EPS) * t + EPS).to(tokens.device)
    is_masked = torch.rand(b, length, generator=generator).to(tokens.device) < p[:, None]
    return torch.where(is_masked, mask_token_id, tokens), is_masked, p


@dataclass
class Losses:
    total: torch.Tensor
    ar: torch.Tensor
    diffusion: torch.Tensor


def joint_loss(
    model: NLDModel, tokens: torch.Tensor, block_size: int, alpha: float, generator: torch.Generator | None = None
) -> Losses:
    """L = L_AR + alpha * L_diff for clean sequences tokens [B, L]."""
    b, length = tokens.shape
    noisy, is_masked, p = add_noise(tokens, model.spec.mask_token_id, generator)
    positions = torch.arange(length, device=tokens.device).repeat(2).expand(b, -1)
    mask = joint_mask(length, block_size, tokens.device).expand(b, -1, -1)
    logits = model.forward_masked(torch.cat([noisy, tokens], dim=1), positions, mask)
    # clean copy: logit i predicts token i+1
    ar = F.cross_entropy(logits[:, length:-1].flatten(0, 1), tokens[:, 1:].flatten())
    # noisy copy: logit i predicts token i (no shift), on masked positions, weighted by 1/p
    ce = F.cross_entropy(logits[:, :length].flatten(0, 1), tokens.flatten(), reduction="none").view(b, length)
    weighted = (ce / p[:, None])[is_masked]
    diffusion = weighted.sum() / is_masked.sum().clamp_min(1)
    return Losses(ar + alpha * diffusion, ar.detach(), diffusion.detach())
