"""The spec_accept and diffusion_commit kernels against their references (exact equality).

On CPU the kernels run under TRITON_INTERPRET (conftest) with 128-wide vocabulary tiles, so the
vocabularies below (37, 257, 1000) end inside a tile and ties can sit in different tiles and lanes.
"""

from __future__ import annotations

import pytest
import torch

from trimode.plugins import ops, reference
from trimode.plugins.diffusion_commit import launch as diffusion_commit
from trimode.plugins.pick import check_logits, sequence_counters
from trimode.plugins.spec_accept import launch as spec_accept

# (b, L, V, temperature): sampled cases stay small, Philox is slow under the interpreter. A float is
# one temperature for every row (with the one SEED); a list is per row (with per-row SEEDS).
SHAPES = [
    (1, 1, 37, 0.0),
    (3, 1, 37, 0.8),
    (3, 4, 257, 0.0),
    (3, 4, 257, 0.8),
    (1, 32, 1000, 0.0),
    (3, 32, 1000, 0.0),
    (1, 32, 257, 1.3),
    (3, 32, 37, 0.8),
    (3, 4, 257, [0.8, 0.0, 1.3]),
    (3, 32, 37, [0.0, 0.5, 0.0]),
]
SEED = 2**40 + 7  # above 2**32: both Philox key words matter
SEEDS = [2**40 + 7, 3, 2**62 + 5]


def sampling(temperature: float | list[float], device: torch.device | str = "cpu"):
    """(temperature, seed) as the launchers take them: Python scalars, or [b] tensors per row."""
    if isinstance(temperature, float):
        return temperature, SEED
    b = len(temperature)
    return torch.tensor(temperature, device=device), torch.tensor(SEEDS[:b], device=device)


def mask_id(vocab_size: int) -> int:
    return vocab_size // 3  # inside a tile, not 0


def random_logits(b: int, length: int, vocab_size: int, seed: int = 0, peak: float = 0.0) -> torch.Tensor:
    """Standard normal logits; with peak > 0, half the rows get one token raised by 6..6+peak, so
    confidences spread from ~0 to ~1 (some above 0.9, none rounding to 1.0)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, length, vocab_size, generator=g)
    if peak > 0:
        rows = torch.rand(b, length, generator=g) < 0.5
        peak_tokens = torch.randint(0, vocab_size, (b, length), generator=g)
        boost = 6.0 + peak * torch.rand(b, length, generator=g)
        logits.scatter_add_(2, peak_tokens[..., None], (boost * rows)[..., None])
    return logits


def assert_accepted_equal(got: reference.Accepted, expected: reference.Accepted) -> None:
    for name, x, y in zip(expected._fields, got, expected):
        assert x.dtype == y.dtype and torch.equal(x.cpu(), y.cpu()), (name, x, y)


# --- spec_accept ------------------------------------------------------------------------------------


def drafts_accepting(tokens: torch.Tensor) -> torch.Tensor:
    """Drafts that the verify tokens accept fully (row 0), not at all (row 1) and up to L // 2 (row 2)."""
    b, length = tokens.shape
    draft = torch.zeros_like(tokens)
    draft[:, 1:] = tokens[:, :-1]
    for row, cut in zip(range(b), [length - 1, 0, length // 2]):
        if cut < length - 1:
            draft[row, cut + 1] = (tokens[row, cut] + 1) % 7  # a wrong draft at cut + 1
    return draft


@pytest.mark.parametrize("b, length, vocab_size, temperature", SHAPES)
def test_spec_accept_matches_reference(device, b, length, vocab_size, temperature):
    logits = random_logits(b, length, vocab_size)
    mask = mask_id(vocab_size)
    tokens = reference.pick_tokens(logits, mask, *sampling(temperature))
    draft = drafts_accepting(tokens)
    eos_ids = tokens[0, :1].clone()  # a token row 0 emits
    expected = reference.spec_accept(logits, draft, mask, eos_ids, *sampling(temperature))
    got = spec_accept(logits.to(device), draft.to(device), mask, eos_ids.to(device), *sampling(temperature, device))
    assert_accepted_equal(got, expected)
    if length > 2 and b == 3:
        assert expected.n.tolist() == [length, 1, length // 2 + 1]


@pytest.mark.parametrize("case", ["inside", "outside", "empty", "several"])
def test_spec_accept_eos_only_among_the_emitted(device, case):
    logits = random_logits(2, 6, 257, seed=1)
    mask = mask_id(257)
    tokens = reference.pick_tokens(logits, mask, 0.0)
    draft = drafts_accepting(tokens)  # row 0 emits all 6, row 1 only a_0
    eos = {"inside": [tokens[1, 0]], "outside": [tokens[1, 3]], "empty": [], "several": [300, tokens[0, 5], 301]}[case]
    eos_ids = torch.tensor(eos, dtype=torch.int64)
    expected = reference.spec_accept(logits, draft, mask, eos_ids)
    got = spec_accept(logits.to(device), draft.to(device), mask, eos_ids.to(device))
    assert_accepted_equal(got, expected)
    assert got.is_eos.tolist() == [
        bool(torch.isin(tokens[0], eos_ids).any()),  # row 0 emits all
        case == "inside",
    ]  # a_3 of row 1 is not


# --- argmax ties and the mask token (both kernels) ---------------------------------------------------


@pytest.mark.parametrize(
    "maxima, expected",
    [
        ([72, 73, 200], 72),  # 72 and 200 share a lane of the 128-wide tiles: the earlier tile wins
        ([256, 130], 130),  # different tiles and lanes: the lowest index, not the lowest lane
        ([5, 6], 5),  # one tile
        ([100, 85], 100),  # the mask token (85) holds a larger value: never picked
    ],
)
def test_argmax_takes_the_first_maximum_and_never_the_mask(device, maxima, expected):
    vocab_size, mask = 257, mask_id(257)
    logits = random_logits(1, 2, vocab_size, seed=2)
    logits[:, :, maxima] = 9.0
    logits[:, :, mask] = 20.0
    draft = torch.zeros(1, 2, dtype=torch.int64)
    got = spec_accept(logits.to(device), draft.to(device), mask, torch.tensor([expected]).to(device))
    assert got.tokens.tolist() == [[expected, expected]] and got.is_eos.tolist() == [True]
    block = torch.full((1, 2), mask, dtype=torch.int64)
    new = diffusion_commit(logits.to(device), block.to(device), mask, 0.0, None)
    assert new.tolist() == [[expected, expected]]
    assert torch.equal(new.cpu(), reference.diffusion_commit(logits, block, mask, 0.0, None))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits(device, dtype):
    """bf16 rounding makes many equal logits: exercises ties on realistic data too."""
    logits = (random_logits(3, 4, 1000, seed=3, peak=8.0) * 3).to(dtype)
    mask = mask_id(1000)
    draft = drafts_accepting(reference.pick_tokens(logits, mask, 0.0))
    eos_ids = torch.tensor([int(draft[0, 2])])
    assert_accepted_equal(
        spec_accept(logits.to(device), draft.to(device), mask, eos_ids.to(device)),
        reference.spec_accept(logits, draft, mask, eos_ids),
    )
    block = torch.full((3, 4), mask)
    new = diffusion_commit(logits.to(device), block.to(device), mask, 0.9, None)
    assert torch.equal(new.cpu(), reference.diffusion_commit(logits, block, mask, 0.9, None))


# --- diffusion_commit --------------------------------------------------------------------------------


def partly_masked(b: int, length: int, mask: int) -> torch.Tensor:
    """Row 0: [s, MASK x (L-1)] (all masked when L = 1); row 1: every other position committed;
    row 2: nothing left to commit."""
    block = torch.arange(b * length).view(b, length) % 5 + mask + 1
    block[0, min(1, length - 1) :] = mask
    if b > 1:
        block[1, ::2] = mask
    return block


@pytest.mark.parametrize("threshold", [0.0, 0.9, 1.0, None])
@pytest.mark.parametrize("b, length, vocab_size, temperature", SHAPES)
def test_diffusion_commit_matches_reference(device, b, length, vocab_size, temperature, threshold):
    logits = random_logits(b, length, vocab_size, seed=4, peak=8.0)
    mask = mask_id(vocab_size)
    block = partly_masked(b, length, mask)
    num_commit = torch.tensor([2, length + 3, 0])[:b] if threshold is None else None  # 0 and > masks too
    expected = reference.diffusion_commit(logits, block, mask, threshold, num_commit, *sampling(temperature))
    original = block.clone().to(device)
    got = diffusion_commit(
        logits.to(device),
        original,
        mask,
        threshold,
        None if num_commit is None else num_commit.to(device),
        *sampling(temperature, device),
    )
    assert torch.equal(got.cpu(), expected)
    assert torch.equal(original.cpu(), block)  # the input block is not modified
    assert (got.cpu() != block).any()  # row 0 always commits something


def test_diffusion_commit_equal_confidences_commit_the_first_positions(device):
    vocab_size, mask = 37, mask_id(37)
    logits = random_logits(1, 6, vocab_size, seed=5)
    logits[0, 1:] = logits[0, 1]  # positions 1..5 equally confident
    block = torch.tensor([[3, mask, 4, mask, mask, mask]])
    new = diffusion_commit(logits.to(device), block.to(device), mask, None, torch.tensor([2]).to(device))
    x0 = int(reference.pick_tokens(logits[0, 1:2], mask, 0.0))
    assert new.tolist() == [[3, x0, 4, x0, mask, mask]]
    assert torch.equal(new.cpu(), reference.diffusion_commit(logits, block, mask, None, torch.tensor([2])))


def test_diffusion_commit_threshold_one_commits_certain_positions(device):
    """One-hot logits make softmax exactly 1.0: the >= 1.0 boundary must agree with the reference."""
    vocab_size, mask = 257, mask_id(257)
    logits = random_logits(1, 4, vocab_size, seed=6)
    logits[0, 1, 9] = logits[0, 2, 11] = 200.0  # certain
    block = torch.full((1, 4), mask)
    new = diffusion_commit(logits.to(device), block.to(device), mask, 1.0, None)
    assert new.tolist()[0][1:3] == [9, 11] and new.tolist()[0].count(mask) == 2
    assert torch.equal(new.cpu(), reference.diffusion_commit(logits, block, mask, 1.0, None))


# --- sampling, counters, arguments, dispatch ---------------------------------------------------------


def test_other_seeds_sample_other_tokens(device):
    logits = random_logits(3, 4, 257, seed=7)
    mask, draft = mask_id(257), torch.zeros(3, 4, dtype=torch.int64, device=device)
    no_eos = torch.zeros(0, dtype=torch.int64, device=device)
    tokens = [spec_accept(logits.to(device), draft, mask, no_eos, 2.0, seed).tokens.cpu() for seed in (1, 2, 1)]
    assert torch.equal(tokens[0], tokens[2]) and not torch.equal(tokens[0], tokens[1])
    assert torch.equal(tokens[1], reference.pick_tokens(logits, mask, 2.0, 2))
    block = torch.full((3, 4), mask)
    new = [diffusion_commit(logits.to(device), block.to(device), mask, 0.0, None, 2.0, seed).cpu() for seed in (1, 2)]
    assert torch.equal(new[0], tokens[0]) and not torch.equal(new[0], new[1])


@pytest.mark.parametrize("case", range(3))
def test_a_row_samples_the_same_tokens_alone_or_in_any_batch(device, case):
    """Random batch sizes, mixed greedy and sampled rows: every row's kernel output equals that row
    launched alone (b = 1) with its own temperature and seed, and the reference's."""
    g = torch.Generator().manual_seed(case)
    b, length, vocab_size = int(torch.randint(2, 6, (1,), generator=g)), 4, 37
    logits = random_logits(b, length, vocab_size, seed=10 + case, peak=8.0)
    temperature = torch.rand(b, generator=g) * 2
    temperature[torch.rand(b, generator=g) < 0.4] = 0.0
    temperature[0] = 1.0  # at least one sampled row
    seed = torch.randint(0, 2**63 - 1, (b,), generator=g)
    mask = mask_id(vocab_size)
    draft = drafts_accepting(reference.pick_tokens(logits, mask, temperature, seed)[:, :length])
    block = partly_masked(b, length, mask)
    no_eos = torch.zeros(0, dtype=torch.int64, device=device)
    on = dict(device=device)

    def accept(rows):
        return spec_accept(
            logits[rows].to(**on), draft[rows].to(**on), mask, no_eos, temperature[rows].to(**on), seed[rows].to(**on)
        )

    def commit(rows):
        return diffusion_commit(
            logits[rows].to(**on),
            block[rows].to(**on),
            mask,
            0.5,
            None,
            temperature[rows].to(**on),
            seed[rows].to(**on),
        ).cpu()

    everything = slice(None)
    batched_accept, batched_commit = accept(everything), commit(everything)
    assert_accepted_equal(batched_accept, reference.spec_accept(logits, draft, mask, no_eos.cpu(), temperature, seed))
    assert torch.equal(batched_commit, reference.diffusion_commit(logits, block, mask, 0.5, None, temperature, seed))
    for r in range(b):
        alone = slice(r, r + 1)
        assert_accepted_equal(accept(alone), reference.Accepted(*(x[alone] for x in batched_accept)))
        assert torch.equal(commit(alone), batched_commit[alone])


def test_strided_logits_and_counters_left_at_zero(device):
    """Rows sliced out of a longer chunk (strided batch dim); the per-sequence counters are back at
    zero after each launch, so later launches with other batch sizes still finish correctly."""
    wide = random_logits(3, 8, 257, seed=8).to(device)
    mask = mask_id(257)
    for b in (3, 2):
        logits = wide[:b, 2:6]
        draft = drafts_accepting(reference.pick_tokens(logits.cpu(), mask, 0.0))
        assert_accepted_equal(
            spec_accept(logits, draft.to(device), mask, torch.tensor([1]).to(device)),
            reference.spec_accept(logits.cpu(), draft, mask, torch.tensor([1])),
        )
        assert not sequence_counters(wide.device, b).any()
        block = partly_masked(b, 4, mask)
        new = diffusion_commit(logits, block.to(device), mask, None, torch.tensor([1, 3, 2][:b]).to(device))
        assert torch.equal(
            new.cpu(), reference.diffusion_commit(logits.cpu(), block, mask, None, torch.tensor([1, 3, 2][:b]))
        )
        assert not sequence_counters(wide.device, b).any()


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(logits=torch.zeros(2, 4, 10, dtype=torch.int64)), "float32"),
        (dict(logits=torch.zeros(2, 4)), r"\[b, L >= 1, V\]"),
        (dict(tokens=torch.zeros(2, 4, dtype=torch.int32)), "int64"),
        (dict(tokens=torch.zeros(2, 5, dtype=torch.int64)), r"\[2, 4\]"),
        (dict(mask=10), "mask_token_id 10"),
        (dict(logits=torch.zeros(2, 10, 4).transpose(1, 2)), "contiguous"),
    ],
)
def test_launchers_reject_bad_arguments(change, message):
    args = dict(logits=torch.zeros(2, 4, 10), tokens=torch.zeros(2, 4, dtype=torch.int64), mask=3) | change
    with pytest.raises(ValueError, match=message):
        spec_accept(args["logits"], args["tokens"], args["mask"], torch.zeros(0, dtype=torch.int64))
    with pytest.raises(ValueError, match=message):
        diffusion_commit(args["logits"], args["tokens"], args["mask"], 0.9, None)


def test_launchers_reject_bad_eos_and_num_commit():
    logits, tokens = torch.zeros(2, 4, 10), torch.zeros(2, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match="eos_ids"):
        spec_accept(logits, tokens, 3, torch.tensor([[1]]))
    with pytest.raises(ValueError, match="num_commit"):
        diffusion_commit(logits, tokens, 3, None, None)
    with pytest.raises(ValueError, match="num_commit"):
        diffusion_commit(logits, tokens, 3, None, torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize(
    "temperature, seed, message",
    [
        (torch.ones(3), torch.zeros(2, dtype=torch.int64), r"temperature: expected float32 \[2\]"),
        (torch.ones(2, dtype=torch.float16), torch.zeros(2, dtype=torch.int64), "temperature: expected float32"),
        (torch.ones(2), torch.zeros(2, dtype=torch.int32), r"seed: expected int64 \[2\]"),
        (torch.ones(2), torch.zeros(2, 1, dtype=torch.int64), r"seed: expected int64 \[2\]"),
        (torch.ones(2, device="meta"), torch.zeros(2, dtype=torch.int64), "temperature is on meta"),
        (0.5, -3, "seed -3 outside"),
    ],
)
def test_launchers_reject_bad_sampling_parameters(temperature, seed, message):
    logits, tokens = torch.zeros(2, 4, 10), torch.zeros(2, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match=message):
        spec_accept(logits, tokens, 3, torch.zeros(0, dtype=torch.int64), temperature, seed)
    with pytest.raises(ValueError, match=message):
        diffusion_commit(logits, tokens, 3, 0.9, None, temperature, seed)


@pytest.mark.parametrize(
    "shape, strides, is_accepted",
    [
        ((1, 2**16, 2**15), (0, 0, 1), False),  # L*V = 2**31: a row's Philox offset overflows
        ((2**12, 2**4, 2**15), (0, 0, 1), True),  # B*L*V = 2**31, L*V = 2**19: per-row offsets fit
    ],
)
def test_philox_offsets_are_checked_per_sequence(shape, strides, is_accepted):
    logits = torch.empty_strided(shape, strides)  # one real row of V floats, repeated
    tokens = torch.empty_strided(shape[:2], (0, 0), dtype=torch.int64)
    if is_accepted:
        check_logits(logits, tokens, 3, ("logits", "tokens"))
    else:
        with pytest.raises(ValueError, match=r"L\*V = 2147483648 >= 2\*\*31"):
            check_logits(logits, tokens, 3, ("logits", "tokens"))


def test_ops_dispatch_to_the_kernels(device, kernels, monkeypatch):
    """TRIMODE_KERNELS=triton: the call sites go through torch.ops.trimode.* into the launchers."""
    import trimode.plugins.diffusion_commit as diffusion_module
    import trimode.plugins.spec_accept as spec_module

    calls = []
    for module in (spec_module, diffusion_module):
        monkeypatch.setattr(module, "launch", lambda *args, _launch=module.launch: calls.append(1) or _launch(*args))
    logits = random_logits(2, 4, 257, seed=9, peak=8.0)
    mask = mask_id(257)
    temperature, seed = torch.tensor([0.8, 0.0]), torch.tensor([5, 2**50])  # per row: sampled, greedy
    draft = drafts_accepting(reference.pick_tokens(logits, mask, temperature, seed))
    eos_ids = torch.tensor([int(draft[0, 1])])
    got = ops.spec_accept(
        logits.to(device), draft.to(device), mask, eos_ids.to(device), temperature.to(device), seed.to(device)
    )
    assert_accepted_equal(got, reference.spec_accept(logits, draft, mask, eos_ids, temperature, seed))
    block = partly_masked(2, 4, mask)
    for threshold, num_commit in [(0.9, None), (None, torch.tensor([1, 2]))]:
        new = ops.diffusion_commit(
            logits.to(device),
            block.to(device),
            mask,
            threshold,
            None if num_commit is None else num_commit.to(device),
            temperature.to(device),
            seed.to(device),
        )
        expected = reference.diffusion_commit(logits, block, mask, threshold, num_commit, temperature, seed)
        assert torch.equal(new.cpu(), expected)
    # the decoders' transition form: one Python float / int for every row
    got = ops.spec_accept(logits.to(device), draft.to(device), mask, eos_ids.to(device), 0.8, 5)
    assert_accepted_equal(got, reference.spec_accept(logits, draft, mask, eos_ids, 0.8, 5))
    assert len(calls) == 4
