"""Micro-benchmarks of the plugins' Triton kernels against PyTorch; prints JSON (and --json PATH).

block_attention  at 8B-like shapes (32 query heads, 8 KV heads, head_dim 128, bf16), prefixes 1k..32k,
                 chunk L = 32 (verify / block passes) and L = 1 (AR decode), against
                 - reference: our torch reference (cache write by index + SDPA with the boolean mask),
                 - sdpa: SDPA alone on the already-written cache with the same mask,
                 - flex: torch.compile'd flex_attention with the same mask as a BlockMask (CUDA only);
                 with --block-size N also `paged`: the kernel on the same keys in a paged pool of
                 N-position blocks in shuffled order (kv_cache.py; the engine's default is 16).
spec_accept      verify logits [B, 32, 131072] fp32: kernel vs torch argmax + compare (the reference).
diffusion_commit block logits [B, 32, 131072] fp32, threshold 0.9: kernel vs the torch reference.
Every row also records the kernel's max error against the reference, so a speed-up is never
reported for a wrong answer. `speedup` = best PyTorch time / kernel time (> 1: the kernel wins).

GPU: python3 scripts/bench_kernels.py --json $OUT/bench_kernels.json   (scripts/gpu_check.sh runs it)
CPU dry run (TRITON_INTERPRET=1, tiny shapes): python scripts/bench_kernels.py --device cpu --small
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch


def timed_us(fn, device: torch.device, reps: int) -> float:
    """Median microseconds per call (triton.testing.do_bench on CUDA: L2 flushed, warm-up)."""
    if device.type == "cuda":
        import triton.testing

        return 1e3 * triton.testing.do_bench(fn, warmup=10, rep=max(reps, 20), return_mode="median")
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e6 * sorted(times)[len(times) // 2]


def attention_rows(
    device, dtype, heads, kv_heads, head_dim, prefixes, chunks, batches, reps, use_flex, block_size=0
) -> list[dict]:
    from trimode.plugins import block_attention as kernel
    from trimode.plugins.reference import ChunkLayout, block_attention

    gen = torch.Generator(device=device).manual_seed(0)
    flex = _flex(device) if use_flex else None
    rows = []
    for b in batches:
        for prefix in prefixes:
            for L, is_causal in chunks:
                S = prefix + L
                q = torch.randn(b, L, heads, head_dim, generator=gen, device=device, dtype=dtype)
                k, v = (
                    torch.randn(b, L, kv_heads, head_dim, generator=gen, device=device, dtype=dtype) for _ in range(2)
                )
                k_cache, v_cache = (
                    torch.randn(b, kv_heads, S, head_dim, generator=gen, device=device, dtype=dtype) for _ in range(2)
                )
                lengths = torch.full((b,), prefix, device=device)
                layout = ChunkLayout.build(lengths, None, L, is_causal)
                expected = block_attention(q, k, v, k_cache, v_cache, layout)
                got = kernel.launch(q, k, v, k_cache, v_cache, lengths, None, is_causal)
                row = {
                    "op": "block_attention",
                    "batch": b,
                    "prefix": prefix,
                    "L": L,
                    "pattern": "causal" if is_causal else "block",
                    "dtype": str(dtype).split(".")[-1],
                    "max_abs_err": float((got.float() - expected.float()).abs().max()),
                }
                row["kernel_us"] = timed_us(
                    lambda: kernel.launch(q, k, v, k_cache, v_cache, lengths, None, is_causal), device, reps
                )
                row["reference_us"] = timed_us(lambda: block_attention(q, k, v, k_cache, v_cache, layout), device, reps)
                qt = q.transpose(1, 2)
                row["sdpa_us"] = timed_us(
                    lambda: torch.nn.functional.scaled_dot_product_attention(
                        qt, k_cache, v_cache, attn_mask=layout.mask, enable_gqa=True
                    ),
                    device,
                    reps,
                )
                if flex is not None:
                    row["flex_us"] = _time_flex(flex, qt, k_cache, v_cache, prefix, L, is_causal, device, reps)
                if block_size:
                    row["paged"] = _paged(
                        kernel, q, k, v, k_cache, v_cache, lengths, is_causal, expected, gen, reps, block_size
                    )
                rows.append(_with_speedup(row))
    return rows


def _paged(kernel, q, k, v, k_cache, v_cache, lengths, is_causal, expected, gen, reps, page) -> dict:
    """The kernel over the same keys in shuffled blocks of `page` positions (plus a null block)."""
    b, num_kv_heads, S, head_dim = k_cache.shape
    T = -(-S // page)
    tables = torch.randperm(b * T, generator=gen, device=q.device).view(b, T)
    pools = []
    for cache in (k_cache, v_cache):
        pool = cache.new_zeros(b * T + 1, num_kv_heads, page, head_dim)
        padded = torch.nn.functional.pad(cache, (0, 0, 0, T * page - S))
        pool[tables] = padded.view(b, num_kv_heads, T, page, head_dim).transpose(1, 2)
        pools.append(pool)
    got = kernel.launch(q, k, v, *pools, lengths, tables, is_causal)
    kernel_us = timed_us(lambda: kernel.launch(q, k, v, *pools, lengths, tables, is_causal), q.device, reps)
    err = float((got.float() - expected.float()).abs().max())
    return {"block_size": page, "kernel_us": round(kernel_us, 2), "max_abs_err": err}


def _flex(device: torch.device):
    if device.type != "cuda":
        return None
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _time_flex(flex, qt, k_cache, v_cache, prefix, L, is_causal, device, reps) -> float | str:
    from torch.nn.attention.flex_attention import create_block_mask

    def visible(b, h, q_idx, kv_idx):
        return kv_idx <= prefix + q_idx if is_causal else kv_idx < prefix + L

    try:
        mask = create_block_mask(visible, B=None, H=None, Q_LEN=L, KV_LEN=k_cache.shape[2], device=device)
        return timed_us(lambda: flex(qt, k_cache, v_cache, block_mask=mask, enable_gqa=True), device, reps)
    except Exception as e:  # reported, not fatal: flex's compiler support varies by torch version
        return f"failed: {type(e).__name__}: {str(e)[:160]}"


def sampling_rows(device, vocab, L, batches, reps) -> list[dict]:
    from trimode.plugins import diffusion_commit as commit_kernel
    from trimode.plugins import spec_accept as accept_kernel
    from trimode.plugins.reference import diffusion_commit, spec_accept

    gen = torch.Generator(device=device).manual_seed(1)
    mask_id, eos = 4, torch.tensor([2], device=device)
    rows = []
    for b in batches:
        logits = torch.randn(b, L, vocab, generator=gen, device=device) * 3
        draft = logits.argmax(-1)
        draft[:, L // 2] = mask_id + 1  # accept about half the block
        draft = torch.cat([draft[:, :1], draft[:, :-1]], 1)
        got, expected = accept_kernel.launch(logits, draft, mask_id, eos), spec_accept(logits, draft, mask_id, eos)
        row = {
            "op": "spec_accept",
            "batch": b,
            "L": L,
            "vocab": vocab,
            "exact": all(torch.equal(x, y) for x, y in zip(got, expected)),
        }
        row["kernel_us"] = timed_us(lambda: accept_kernel.launch(logits, draft, mask_id, eos), device, reps)
        row["reference_us"] = timed_us(lambda: spec_accept(logits, draft, mask_id, eos), device, reps)
        rows.append(_with_speedup(row))

        block = torch.full((b, L), mask_id, device=device)
        block[:, 0] = 7
        got = commit_kernel.launch(logits, block, mask_id, 0.9, None)
        row = {
            "op": "diffusion_commit",
            "batch": b,
            "L": L,
            "vocab": vocab,
            "threshold": 0.9,
            "exact": torch.equal(got, diffusion_commit(logits, block, mask_id, 0.9, None)),
        }
        row["kernel_us"] = timed_us(lambda: commit_kernel.launch(logits, block, mask_id, 0.9, None), device, reps)
        row["reference_us"] = timed_us(lambda: diffusion_commit(logits, block, mask_id, 0.9, None), device, reps)
        rows.append(_with_speedup(row))
    return rows


def _with_speedup(row: dict) -> dict:
    baselines = [v for k, v in row.items() if k.endswith("_us") and k != "kernel_us" and isinstance(v, float)]
    for k in [k for k in row if k.endswith("_us") and isinstance(row[k], float)]:
        row[k] = round(row[k], 2)
    row["speedup"] = round(min(baselines) / row["kernel_us"], 3)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="CPU dry run: tiny shapes (TRITON_INTERPRET=1)")
    parser.add_argument("--no-flex", action="store_true", help="skip flex_attention (its compiles take time)")
    parser.add_argument(
        "--block-size", type=int, default=0, help="also time block_attention on a paged pool of these blocks (0: off)"
    )
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("on CPU the kernels need TRITON_INTERPRET=1 in the environment", file=sys.stderr)
        return 2
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)",
    }
    import triton

    report["triton"] = triton.__version__
    if args.small:
        report["rows"] = attention_rows(
            device, torch.float32, 4, 2, 16, (16, 40), ((4, True), (1, True)), (1,), 2, False, args.block_size
        ) + sampling_rows(device, 300, 4, (1,), 2)
    else:
        report["rows"] = attention_rows(
            device,
            torch.bfloat16,
            32,
            8,
            128,
            (1024, 4096, 16384, 32768),
            ((32, True), (32, False), (1, True)),
            (1, 8),
            50,
            not args.no_flex,
            args.block_size,
        )
        report["rows"] += sampling_rows(device, 131072, 32, (1, 8, 64), 50)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_path:
        with open(args.json_path, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
