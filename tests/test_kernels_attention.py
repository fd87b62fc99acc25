"""The block_attention Triton kernel against its reference (interpreted on CPU, compiled on CUDA)."""

from __future__ import annotations

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


def make_case(device, b, H, Hkv, D, L, lengths, dtype=torch.float32, fp8=False, num_rows=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = num_rows or b
    S = max(lengths) + L + 3

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(device)

    q, k, v = rand(b, L, H, D), rand(b, L, Hkv, D), rand(b, L, Hkv, D)
    k_cache, v_cache = rand(rows, Hkv, S, D), rand(rows, Hkv, S, D)
    k_scale = v_scale = None
    if fp8:
        k_scale, v_scale = torch.tensor(0.011, device=device), torch.tensor(0.017, device=device)
        k_cache = (k_cache.float() / k_scale).to(E4M3)
        v_cache = (v_cache.float() / v_scale).to(E4M3)
    return q, k, v, k_cache, v_cache, torch.tensor(lengths, device=device), k_scale, v_scale


def run_both(case, is_causal, rows=None):
    q, k, v, k_cache, v_cache, lengths, k_scale, v_scale = case
    kc, vc = k_cache.clone(), v_cache.clone()
    out = launch(q, k, v, k_cache, v_cache, lengths, rows, is_causal, k_scale, v_scale)
    expected = block_attention(
        q, k, v, kc, vc, ChunkLayout.build(lengths, rows, q.shape[1], is_causal), k_scale, v_scale
    )
    return out, expected, (k_cache, v_cache), (kc, vc)


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


def test_cache_rows_select_sequences(device):
    """rows map batch entries onto cache rows (the decoders' active subset); other rows stay untouched."""
    case = make_case(device, 2, 4, 2, 16, 4, [2, 5], num_rows=4)
    rows = torch.tensor([3, 1], device=device)
    untouched = [case[3][[0, 2]].clone(), case[4][[0, 2]].clone()]
    out, expected, caches, expected_caches = run_both(case, True, rows)
    torch.testing.assert_close(out, expected, atol=fp32_atol(expected, 16, 9), rtol=0)
    assert all(torch.equal(c, e) for c, e in zip(caches, expected_caches))
    assert torch.equal(caches[0][[0, 2]], untouched[0]) and torch.equal(caches[1][[0, 2]], untouched[1])


@pytest.mark.parametrize("c", [60, 124], ids=["tiles", "splits"])  # the chunk straddles two key tiles / splits
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunk_and_batch_invariance(device, dtype, c):
    """A query's output is bit-identical alone (AR decode, L=1, batch 1) and inside a causal chunk
    of 8 in a batch of 3: the property self-speculation == AR needs on the GPU."""
    b, H, Hkv, D, L = 3, 4, 2, 16, 8
    q, k, v, k_cache, v_cache, _, _, _ = make_case(device, b, H, Hkv, D, L, [c] * b, dtype=dtype, seed=3)
    chunk_out = launch(q, k, v, k_cache, v_cache, torch.full((b,), c, device=device), None, True)
    # The chunk launch wrote its K/V into k_cache / v_cache: replay sequence 1 token by token over
    # copies of that cache row, each token seeing exactly the keys it saw inside the chunk.
    for i in range(L):
        lengths = torch.tensor([c + i], device=device)
        single = launch(
            q[1:2, i : i + 1],
            k[1:2, i : i + 1],
            v[1:2, i : i + 1],
            k_cache[1:2].clone(),
            v_cache[1:2].clone(),
            lengths,
            None,
            True,
        )
        assert torch.equal(single[0, 0], chunk_out[1, i]), f"token {i}"


def test_ops_dispatch_uses_the_kernel(device, kernels, monkeypatch):
    """With TRIMODE_KERNELS=triton the runtime's call site goes through torch.ops.trimode.block_attention."""
    calls = []
    real = torch.ops.trimode.block_attention

    class Spy:
        def __call__(self, *args):
            calls.append(args)
            return real(*args)

    monkeypatch.setattr(torch.ops.trimode, "block_attention", Spy())
    q, k, v, k_cache, v_cache, lengths, _, _ = make_case(device, 2, 4, 2, 16, 4, [1, 3])
    kc, vc = k_cache.clone(), v_cache.clone()
    layout = ChunkLayout.build(lengths, None, 4, False)
    out = ops.block_attention(q, k, v, k_cache, v_cache, layout)
    expected = block_attention(q, k, v, kc, vc, layout)
    assert len(calls) == 1
    torch.testing.assert_close(out, expected, atol=fp32_atol(expected, 16, 7), rtol=0)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: (c[0][..., :8],) + c[1:], "do not fit"),
        (lambda c: c[:3] + (c[3].double(), c[4].double()) + c[5:], "cache dtype"),
        (lambda c: c[:3] + (c[3].to(E4M3), c[4].to(E4M3)) + c[5:], "k_scale"),
        (lambda c: c[:5] + (c[5][:1],) + c[6:], "lengths"),
    ],
)
def test_launcher_rejects_bad_input(device, change, message):
    case = change(make_case(device, 2, 4, 2, 16, 4, [1, 3]))
    with pytest.raises(ValueError, match=message):
        launch(*case[:6], None, True, *case[6:])


def test_unknown_kernel_choice_is_a_config_error(monkeypatch):
    from trimode.errors import ConfigError

    monkeypatch.setenv(ops.KERNELS_ENV, "cuda-please")
    with pytest.raises(ConfigError, match="TRIMODE_KERNELS"):
        ops.use_kernels(torch.device("cpu"))
