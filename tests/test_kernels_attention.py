"""The block_attention Triton kernel against its reference (interpreted on CPU, compiled on CUDA)."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

from trimode.plugins import ops
from trimode.plugins.block_attention import launch
from trimode.plugins.reference import ChunkLayout, block_attention

from tolerance import attention_accumulations, bound

pytestmark = pytest.mark.numerics  # rerun on another CPU kernel path (Makefile)

E4M3 = torch.float8_e4m3fn
# half outputs: kernel and reference each round their fp32 result once, so they may sit 2 ulps apart
# (fp16 ulp 2^-10, bf16 2^-7 near 1)
HALF_TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 2e-2}


def fp32_atol(expected: torch.Tensor, D: int, S: int) -> float:
    """The kernel's online softmax over key tiles and splits is the reference's sums in another order."""
    return bound(expected, attention_accumulations(D, S))


class Case(NamedTuple):
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    lengths: torch.Tensor
    tables: torch.Tensor | None  # None: the dense cache whose rows are the batch
    k_scale: torch.Tensor | None
    v_scale: torch.Tensor | None


def make_case(device, b, H, Hkv, D, L, lengths, dtype=torch.float32, fp8=False, num_rows=None, seed=0) -> Case:
    """A dense cache [num_rows or b, Hkv, max(lengths) + L + 3, D] of random values."""
    g = torch.Generator().manual_seed(seed)
    S = max(lengths) + L + 3
    q, k, v = (rand(g, device, dtype, *shape) for shape in ((b, L, H, D), (b, L, Hkv, D), (b, L, Hkv, D)))
    caches = [rand(g, device, dtype, num_rows or b, Hkv, S, D) for _ in range(2)]
    return with_scales(Case(q, k, v, *caches, torch.tensor(lengths, device=device), None, None, None), fp8)


def make_paged_case(device, b, H, Hkv, D, L, lengths, page, fp8=False, num_spare=3, seed=0) -> Case:
    """A paged pool of blocks of `page` positions, in random order: each row holds the blocks its
    prefix and chunk need, its table is padded with the null block (the last one) to the longest
    row's and one more entry, and num_spare blocks belong to no row."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (rand(g, device, torch.float32, *shape) for shape in ((b, L, H, D), (b, L, Hkv, D), (b, L, Hkv, D)))
    needed = [-(-(n + L) // page) for n in lengths]
    num_blocks = sum(needed) + num_spare + 1
    null = num_blocks - 1
    order = torch.randperm(null, generator=g).tolist()
    tables = torch.full((b, max(needed) + 1), null, dtype=torch.int64)
    for i, n in enumerate(needed):
        tables[i, :n] = torch.tensor(order[:n])
        order = order[n:]
    caches = [rand(g, device, torch.float32, num_blocks, Hkv, page, D) for _ in range(2)]
    return with_scales(Case(q, k, v, *caches, torch.tensor(lengths, device=device), tables.to(device), None, None), fp8)


def rand(g, device, dtype, *shape):
    return torch.randn(*shape, generator=g).to(dtype).to(device)


def with_scales(case: Case, fp8: bool) -> Case:
    if not fp8:
        return case
    k_scale, v_scale = (torch.tensor(s, device=case.q.device) for s in (0.011, 0.017))
    k_cache, v_cache = (case.k_cache.float() / k_scale).to(E4M3), (case.v_cache.float() / v_scale).to(E4M3)
    return case._replace(k_cache=k_cache, v_cache=v_cache, k_scale=k_scale, v_scale=v_scale)


def run_both(case: Case, is_causal, row_width=0):
    """The kernel on the case's caches, the reference on copies -> (out, expected, caches, expected caches)."""
    kc, vc = case.k_cache.clone(), case.v_cache.clone()
    out = launch(*case[:7], is_causal, case.k_scale, case.v_scale, row_width=row_width)
    layout = ChunkLayout.build(case.lengths, case.tables, case.q.shape[1], is_causal, None, None, row_width)
    expected = block_attention(case.q, case.k, case.v, kc, vc, layout, case.k_scale, case.v_scale)
    return out, expected, (case.k_cache, case.v_cache), (kc, vc)


def unowned_blocks(case: Case) -> list[int]:
    """Blocks no table row names (the spare ones and the null block)."""
    owned = set(case.tables.flatten().tolist())
    return [i for i in range(case.k_cache.shape[0]) if i not in owned]


@pytest.mark.parametrize("is_causal", [True, False], ids=["causal", "block"])
@pytest.mark.parametrize(
    "b, H, Hkv, D, L, lengths",
    [
        (1, 4, 4, 16, 1, [0]),  # first token, MHA
        (1, 8, 2, 32, 1, [37]),  # AR decode, GQA 4:1
        (2, 4, 2, 16, 4, [0, 7]),  # ragged prefixes, one empty
        (3, 4, 1, 16, 4, [5, 5, 20]),  # GQA 4:1 (MQA-like), equal and longer prefixes
        (2, 6, 3, 24, 32, [3, 0]),  # a full block; head_dim not a power of two
        (1, 2, 2, 64, 32, [41]),  # keys span several tiles
        (2, 4, 2, 16, 4, [0, 300]),  # split-KV (128 keys a split on CPU): 1 and 3 splits in one batch
        (1, 8, 2, 16, 32, [200]),  # a chunk of 32 crossing a split boundary
        (2, 4, 4, 16, 1, [260, 129]),  # AR decode over 3 splits
    ],
)
def test_kernel_matches_reference(device, is_causal, b, H, Hkv, D, L, lengths):
    out, expected, caches, expected_caches = run_both(make_case(device, b, H, Hkv, D, L, lengths), is_causal)
    torch.testing.assert_close(out, expected, atol=fp32_atol(expected, D, max(lengths) + L), rtol=0)
    assert all(torch.equal(c, e) for c, e in zip(caches, expected_caches))  # chunk K/V written at lengths


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("is_causal", [True, False], ids=["causal", "block"])
def test_half_precision(device, dtype, is_causal):
    out, expected, caches, expected_caches = run_both(make_case(device, 2, 4, 2, 16, 4, [6, 0], dtype=dtype), is_causal)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected.float(), atol=HALF_TOLERANCE[dtype], rtol=HALF_TOLERANCE[dtype])
    assert all(torch.equal(c, e) for c, e in zip(caches, expected_caches))


@pytest.mark.parametrize("lengths", [[3, 9], [140, 300]], ids=["short", "split-kv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("L", [1, 4])
def test_fp8_cache_codes_and_output(device, dtype, L, lengths):
    """The chunk is quantized into float8 codes exactly as the reference does (ties to even)."""
    case = make_case(device, 2, 4, 2, 16, L, lengths, dtype=dtype, fp8=True)
    case[1][0, 0, 0, :4] = torch.tensor([0.011 * 2.5, 0.011 * 3.5, -0.011 * 8.5, 1e9], dtype=dtype)  # ties, saturation
    out, expected, caches, expected_caches = run_both(case, True)
    for c, e in zip(caches, expected_caches):
        assert c.dtype == E4M3 and torch.equal(c.view(torch.uint8), e.view(torch.uint8))
    atol = fp32_atol(expected, 16, max(lengths) + L) if dtype == torch.float32 else HALF_TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expected.float(), atol=atol, rtol=0 if dtype == torch.float32 else atol)


def test_dense_tables_select_cache_rows(device):
    """A dense cache with tables [[3], [1]]: the decoders' active subset of rows; other rows stay untouched."""
    case = make_case(device, 2, 4, 2, 16, 4, [2, 5], num_rows=4)
    case = case._replace(tables=torch.tensor([[3], [1]], device=device))
    untouched = [case.k_cache[[0, 2]].clone(), case.v_cache[[0, 2]].clone()]
    out, expected, caches, expected_caches = run_both(case, True)
    torch.testing.assert_close(out, expected, atol=fp32_atol(expected, 16, 9), rtol=0)
    assert all(torch.equal(c, e) for c, e in zip(caches, expected_caches))
    assert torch.equal(caches[0][[0, 2]], untouched[0]) and torch.equal(caches[1][[0, 2]], untouched[1])


# --- paged caches --------------------------------------------------------------------------------------
# Blocks of 4 and 16 positions (smaller than the interpreter's 64-key tile, so one tile spans several
# blocks) and of 96 (larger, and not a multiple of it: a block boundary inside a tile).


@pytest.mark.parametrize("is_causal", [True, False], ids=["causal", "block"])
@pytest.mark.parametrize(
    "page, b, H, Hkv, D, L, lengths",
    [
        (4, 2, 4, 2, 16, 4, [0, 7]),  # ragged, one empty prefix, GQA 2:1
        (4, 3, 4, 1, 16, 8, [5, 4, 21]),  # GQA 4:1, chunks crossing block boundaries
        (4, 2, 4, 2, 16, 4, [150, 3]),  # split-KV: capacity 160 > 128 under the interpreter
        (16, 1, 8, 2, 16, 1, [37]),  # AR decode
        (16, 2, 6, 3, 24, 32, [3, 17]),  # a full block pass over three blocks; head_dim not a power of two
        (16, 1, 4, 4, 16, 32, [200]),  # split-KV, the chunk crossing a split boundary
        (96, 2, 4, 2, 16, 8, [90, 0]),  # a block larger than a key tile
    ],
)
def test_paged_kernel_matches_reference(device, is_causal, page, b, H, Hkv, D, L, lengths):
    case = make_paged_case(device, b, H, Hkv, D, L, lengths, page)
    spare = unowned_blocks(case)
    before = [case.k_cache[spare].clone(), case.v_cache[spare].clone()]
    out, expected, caches, expected_caches = run_both(case, is_causal)
    torch.testing.assert_close(out, expected, atol=fp32_atol(expected, D, max(lengths) + L), rtol=0)
    assert all(torch.equal(c, e) for c, e in zip(caches, expected_caches))  # chunk K/V written in its blocks
    # blocks in no table row (the spare ones, and the null block: no chunk runs past its blocks here)
    assert all(torch.equal(c[spare], x) for c, x in zip(caches, before))
    for i, n in enumerate(lengths):  # the chunk's keys sit at positions n .. n+L-1 of the row's blocks
        pos = torch.arange(n, n + L, device=device)
        assert torch.equal(caches[0][case.tables[i, pos // page], :, pos % page], case.k[i])


@pytest.mark.parametrize("lengths", [[3, 9], [140, 30]], ids=["short", "split-kv"])
@pytest.mark.parametrize("page", [4, 16])
def test_paged_fp8_cache(device, page, lengths):
    """The float8 path on a paged pool: codes written in the row's blocks exactly as the reference."""
    case = make_paged_case(device, 2, 4, 2, 16, 4, lengths, page, fp8=True, seed=1)
    spare = unowned_blocks(case)
    before = case.k_cache[spare].view(torch.uint8).clone()
    out, expected, caches, expected_caches = run_both(case, True)
    for c, e in zip(caches, expected_caches):
        assert c.dtype == E4M3 and torch.equal(c.view(torch.uint8), e.view(torch.uint8))
    assert torch.equal(caches[0][spare].view(torch.uint8), before)
    torch.testing.assert_close(out, expected, atol=fp32_atol(expected, 16, max(lengths) + 4), rtol=0)


def test_chunk_past_its_blocks_writes_the_null_block(device):
    """A row whose table ends before its chunk does (a padded chunk): the excess lands in the null
    block, as in the reference, and no other row's block is written."""
    case = make_paged_case(device, 2, 4, 2, 16, 4, [5, 2], 4, num_spare=1)
    null = case.k_cache.shape[0] - 1
    tables = case.tables.clone()
    tables[0, 2] = null  # row 0 writes positions 5..8: position 8 has no block of its own
    case = case._replace(tables=tables)
    out, expected, caches, expected_caches = run_both(case, False)
    torch.testing.assert_close(out, expected, atol=fp32_atol(expected, 16, 9), rtol=0)
    assert all(torch.equal(c, e) for c, e in zip(caches, expected_caches))
    assert torch.equal(caches[0][null, :, 0], case.k[0, 3])


@pytest.mark.parametrize("is_causal", [True, False], ids=["causal", "block"])
@pytest.mark.parametrize("page, lengths", [(4, [6, 0, 13]), (16, [150, 40, 3])], ids=["short", "split-kv"])
def test_paged_layout_equals_dense_layout(device, is_causal, page, lengths):
    """The layout itself: the same keys in a dense cache and scattered over shuffled blocks give
    bit-identical kernel outputs (the same tiles, splits and sums; only the addresses differ), the
    same cache contents after the write, and reference outputs within the reordering bound."""
    b, H, Hkv, D, L = 3, 4, 2, 16, 4
    paged = make_paged_case(device, b, H, Hkv, D, L, lengths, page, seed=2)
    T = paged.tables.shape[1]

    def dense_view(cache):  # [b, Hkv, T * page, D]: each row's blocks in table order (null block included)
        return cache[paged.tables].transpose(1, 2).reshape(b, Hkv, T * page, D)

    dense = paged._replace(k_cache=dense_view(paged.k_cache), v_cache=dense_view(paged.v_cache), tables=None)
    out_paged, expected_paged, paged_caches, _ = run_both(paged, is_causal)
    out_dense, expected_dense, dense_caches, _ = run_both(dense, is_causal)
    assert torch.equal(out_paged, out_dense)
    assert all(torch.equal(dense_view(p), d) for p, d in zip(paged_caches, dense_caches))
    atol = fp32_atol(expected_dense, D, max(lengths) + L)
    torch.testing.assert_close(expected_paged, expected_dense, atol=atol, rtol=0)


@pytest.mark.parametrize("c", [60, 124], ids=["tiles", "splits"])  # the chunk straddles two key tiles / splits
@pytest.mark.parametrize("dtype, page", [(torch.float32, None), (torch.bfloat16, None), (torch.float32, 16)])
def test_chunk_and_batch_invariance(device, dtype, page, c):
    """A query's output is bit-identical alone (AR decode, L=1, batch 1) and inside a causal chunk
    of 8 in a batch of 3: the property self-speculation == AR needs on the GPU. page 16: a paged
    pool in shuffled blocks, the chunk crossing a block boundary."""
    b, H, Hkv, D, L = 3, 4, 2, 16, 8
    if page is None:
        case = make_case(device, b, H, Hkv, D, L, [c] * b, dtype=dtype, seed=3)
    else:
        case = make_paged_case(device, b, H, Hkv, D, L, [c] * b, page, seed=3)
    q, k, v, k_cache, v_cache, lengths, tables = case[:7]
    chunk_out = launch(q, k, v, k_cache, v_cache, lengths, tables, True)
    assert_replayed_alone_equal(case, chunk_out, c, L)


def assert_replayed_alone_equal(case: Case, chunk_out: torch.Tensor, length: int, count: int) -> None:
    """The chunk launch wrote its K/V into the case's caches: replay sequence 1's first `count` chunk
    tokens one by one (an AR decode at position length + i) over copies of its cache row (dense) or
    of the pool with its table row (paged), each seeing exactly the keys it saw inside the chunk."""
    q, k, v, k_cache, v_cache, _, tables = case[:7]
    for i in range(count):
        single = launch(
            q[1:2, i : i + 1],
            k[1:2, i : i + 1],
            v[1:2, i : i + 1],
            k_cache[1:2].clone() if tables is None else k_cache.clone(),
            v_cache[1:2].clone() if tables is None else v_cache.clone(),
            torch.tensor([length + i], device=q.device),
            None if tables is None else tables[1:2],
            True,
        )
        assert torch.equal(single[0, 0], chunk_out[1, i]), f"token {i}"


# --- quadratic chunks (row_width W: W(W+1) tokens, the verify chain then W rows of W masks) -------------


@pytest.mark.parametrize(
    "page, W, b, H, Hkv, D, lengths",
    [
        (None, 2, 2, 4, 2, 16, [0, 7]),  # ragged, one empty prefix, GQA 2:1
        (None, 3, 3, 4, 1, 16, [5, 0, 20]),  # GQA 4:1
        (None, 4, 2, 6, 3, 24, [50, 0]),  # the masks straddle a key tile (64); head_dim not a power of two
        (None, 3, 2, 4, 2, 16, [120, 300]),  # split-KV: the chunk crosses a split (128); 1 and 4 splits
        (4, 2, 2, 4, 2, 16, [0, 7]),  # paged: rows of masks across blocks of 4
        (4, 3, 3, 4, 1, 16, [5, 4, 21]),
        (16, 4, 2, 4, 2, 16, [150, 0]),  # split-KV on a paged pool
        (96, 4, 2, 4, 2, 16, [90, 0]),  # a block larger than a key tile, the chunk across two blocks
    ],
)
def test_quadratic_matches_reference(device, page, W, b, H, Hkv, D, lengths):
    L = W * (W + 1)
    if page is None:
        case = make_case(device, b, H, Hkv, D, L, lengths)
    else:
        case = make_paged_case(device, b, H, Hkv, D, L, lengths, page)
    out, expected, caches, expected_caches = run_both(case, True, W)
    torch.testing.assert_close(out, expected, atol=fp32_atol(expected, D, max(lengths) + L), rtol=0)
    assert all(torch.equal(c, e) for c, e in zip(caches, expected_caches))  # all W(W+1) K/V at lengths + 0..L-1
    # a mask row sees its own row's masks, not just the causal chain: the causal pattern differs there
    causal = launch(*case[:7], True, case.k_scale, case.v_scale)
    assert torch.equal(causal[:, :W], out[:, :W]) and not torch.allclose(causal[:, W:], out[:, W:])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_quadratic_half_precision(device, dtype):
    out, expected, caches, expected_caches = run_both(make_case(device, 2, 4, 2, 16, 6, [6, 0], dtype=dtype), True, 2)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected.float(), atol=HALF_TOLERANCE[dtype], rtol=HALF_TOLERANCE[dtype])
    assert all(torch.equal(c, e) for c, e in zip(caches, expected_caches))


@pytest.mark.parametrize("page", [None, 4], ids=["dense", "paged"])
def test_quadratic_fp8_cache(device, page):
    """Float8 codes of all W(W+1) tokens written exactly as the reference; one row over two splits."""
    W, lengths = 3, [140, 3]
    if page is None:
        case = make_case(device, 2, 4, 2, 16, 12, lengths, fp8=True)
    else:
        case = make_paged_case(device, 2, 4, 2, 16, 12, lengths, page, fp8=True, seed=1)
    out, expected, caches, expected_caches = run_both(case, True, W)
    for c, e in zip(caches, expected_caches):
        assert c.dtype == E4M3 and torch.equal(c.view(torch.uint8), e.view(torch.uint8))
    torch.testing.assert_close(out, expected, atol=fp32_atol(expected, 16, max(lengths) + 12), rtol=0)


@pytest.mark.parametrize("W", [2, 4])
@pytest.mark.parametrize("c", [60, 124], ids=["tiles", "splits"])
@pytest.mark.parametrize("dtype, page", [(torch.float32, None), (torch.bfloat16, None), (torch.float32, 16)])
def test_quadratic_chain_equals_ar_decode(device, dtype, page, c, W):
    """The verify chain t_0 .. t_(W-1) of a quadratic chunk gets the bits an AR decode of the same
    position gets over the same cache: what quadratic self-speculation == AR needs on the GPU. The
    chain shares its query tile with masks whose keys lie past the chain's, in the next key tile (c
    60) or the next split (c 124), which the chain's rows must see as exact zeros."""
    b, H, Hkv, D, L = 3, 4, 2, 16, W * (W + 1)
    lengths = [c + 3, c, 7]
    if page is None:
        case = make_case(device, b, H, Hkv, D, L, lengths, dtype=dtype, seed=4)
    else:
        case = make_paged_case(device, b, H, Hkv, D, L, lengths, page, seed=4)
    q, k, v, k_cache, v_cache, lengths, tables = case[:7]
    chunk_out = launch(q, k, v, k_cache, v_cache, lengths, tables, True, row_width=W)
    assert_replayed_alone_equal(case, chunk_out, c, W)  # the chain, each token as an AR decode


def test_launcher_rejects_a_quadratic_chunk_of_the_wrong_length(device):
    case = make_case(device, 1, 2, 2, 16, 5, [3])
    with pytest.raises(ValueError, match=r"W\(W\+1\) tokens, not 5"):
        launch(*case[:7], True, row_width=2)


@pytest.mark.parametrize("row_width", [0, 2], ids=["block", "quadratic"])
def test_ops_dispatch_uses_the_kernel(device, kernels, monkeypatch, row_width):
    """With TRIMODE_KERNELS=triton the runtime's call site goes through torch.ops.trimode.block_attention."""
    calls = []
    real = torch.ops.trimode.block_attention

    class Spy:
        def __call__(self, *args):
            calls.append(args)
            return real(*args)

    monkeypatch.setattr(torch.ops.trimode, "block_attention", Spy())
    L = row_width * (row_width + 1) or 4
    q, k, v, k_cache, v_cache, lengths, tables = make_paged_case(device, 2, 4, 2, 16, L, [1, 3], 4)[:7]
    kc, vc = k_cache.clone(), v_cache.clone()
    layout = ChunkLayout.build(lengths, tables, L, bool(row_width), None, None, row_width)
    out = ops.block_attention(q, k, v, k_cache, v_cache, layout)
    expected = block_attention(q, k, v, kc, vc, layout)
    assert len(calls) == 1 and calls[0][6] is tables and calls[0][8] == row_width  # the layout's tables, W
    torch.testing.assert_close(out, expected, atol=fp32_atol(expected, 16, 3 + L), rtol=0)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c._replace(q=c.q[..., :8]), "do not fit"),
        (lambda c: c._replace(k_cache=c.k_cache.double(), v_cache=c.v_cache.double()), "cache dtype"),
        (lambda c: c._replace(k_cache=c.k_cache.to(E4M3), v_cache=c.v_cache.to(E4M3)), "k_scale"),
        (lambda c: c._replace(lengths=c.lengths[:1]), "lengths"),
        (lambda c: c._replace(tables=c.tables[:1]), r"tables must be int64 \[2, T\]"),
        (lambda c: c._replace(tables=c.tables[:, 0]), "tables must be int64"),
        (lambda c: c._replace(tables=c.tables.int()), "tables must be int64"),
        (lambda c: c._replace(tables=c.tables.t().contiguous().t()), "tables must be contiguous"),
    ],
)
def test_launcher_rejects_bad_input(device, change, message):
    case = change(make_paged_case(device, 2, 4, 2, 16, 4, [1, 3], 4))
    with pytest.raises(ValueError, match=message):
        launch(*case[:7], True, *case[7:])


def test_unknown_kernel_choice_is_a_config_error(monkeypatch):
    from trimode.errors import ConfigError

    monkeypatch.setenv(ops.KERNELS_ENV, "cuda-please")
    with pytest.raises(ConfigError, match="TRIMODE_KERNELS"):
        ops.use_kernels(torch.device("cpu"))
