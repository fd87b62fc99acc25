"""The fixture's training pieces: corpus split, the joint mask and noise, a few real steps."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from trimode.checkpoint import load_checkpoint
from trimode.make_checkpoint import tiny_spec
from trimode.training.corpus import HELD_OUT, split_files
from trimode.training.objective import add_noise, joint_mask
from trimode.training.train import TrainSettings, train


def test_corpus_split_is_fixed_and_disjoint():
    train_files, held = split_files()
    assert [p.name for p in held] == [h.split("/")[-1] for h in HELD_OUT]
    assert not set(train_files) & set(held)
    assert len(train_files) > 100 and train_files == sorted(train_files)
    assert not any("test" in p.parts for p in train_files)


def test_joint_mask_follows_spec_section_9():
    L, bs = 6, 2
    m = joint_mask(L, bs)
    noisy, clean = range(0, L), range(L, 2 * L)
    for i in noisy:
        for j in noisy:
            assert m[i, j] == (i // bs == j // bs)  # bidirectional inside a block
        for j in clean:
            assert m[i, j] == ((j - L) // bs < i // bs)  # clean tokens of earlier blocks
    for i in clean:
        for j in noisy:
            assert not m[i, j]  # clean never sees noisy
        for j in clean:
            assert m[i, j] == (j <= i)  # causal


def test_noise_rate_follows_t():
    g = torch.Generator().manual_seed(0)
    tokens = torch.full((2000, 64), 7)
    noisy, is_masked, p = add_noise(tokens, 4, g)
    assert torch.equal(noisy == 4, is_masked)
    assert ((1e-3 <= p) & (p <= 1)).all()
    per_row = is_masked.float().mean(1)
    assert (per_row - p).abs().mean() < 0.06  # binomial noise around p at 64 tokens
    assert torch.corrcoef(torch.stack([per_row, p]))[0, 1] > 0.95


def test_a_few_training_steps_lower_both_losses(tmp_path):
    spec = tiny_spec(vocab_size=512, block_size=4)
    settings = TrainSettings(
        steps=40, batch_size=8, seq_len=64, lr=3e-3, warmup=5, block_sizes=(4,), num_files=12, use_bf16_autocast=False
    )
    log = train(tmp_path / "ck", settings, spec=spec, progress=False)
    hist = log["history"]
    first = {k: sum(h[k] for h in hist[:5]) / 5 for k in ("ar", "diffusion")}
    last = {k: sum(h[k] for h in hist[-5:]) / 5 for k in ("ar", "diffusion")}
    assert last["ar"] < first["ar"] - 0.5, (first, last)
    assert last["diffusion"] < first["diffusion"] - 0.5, (first, last)
    ck = load_checkpoint(tmp_path / "ck")  # the loader reads what training wrote, unchanged
    assert ck.spec.block_size == 4 and json.loads((tmp_path / "ck" / "training_log.json").read_text())
    with pytest.raises(Exception, match="exists"):
        train(tmp_path / "ck", dataclasses.replace(settings, steps=1), spec=spec, progress=False)
