"""GPU-only checks, one script, under 5 minutes on one H100/H200; prints JSON (and --json PATH).

1. FP8 GEMM: trimode.fp8.FP8Linear's torch._scaled_mm path against its exact simulation, and its
   speed against a bf16 F.linear at 8B shapes (hidden 4096, MLP 14336), M = 1 .. 4096 tokens.
2. The invariant on CUDA: self-speculation (block 8) emits the AR greedy tokens on the embedded
   checkpoint in bf16, at batch 1 and 8 (held-out prompts). Reported, not asserted: bf16 kernels are
   not batch-invariant, so a mismatch here is a finding for the plugins issue, not a crash.
3. Async AR steps (decoding/ar.py) on CUDA: the host syncs a running batch's step makes, counted by
   torch.cuda.set_sync_debug_mode (the design: none but the wait for the last step's tokens), and
   their tokens against the synchronous engine's; and auto's tokens on async AR steps against AR's.

Run on the device machine from the repository root (it has torch + CUDA; carry wheels for
safetensors, tokenizers, click, tqdm if missing):  PYTHONPATH=. python scripts/gpu_check.py --json $OUT/gpu.json
`--device cpu --small` dry-runs every code path on a CPU (tests/test_scripts.py does).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time

import torch
import torch.nn.functional as F

from trimode.fp8 import E4M3_MAX, FP8Linear, gpu_has_fp8, quantize_e4m3

SHAPES_8B = [(4096, 14336), (14336, 4096), (4096, 4096)]  # (in, out): gate/up, down, q/o


def timed(fn, device: torch.device, reps: int) -> float:
    """Median seconds per call."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def fp8_gemm(device: torch.device, shapes, tokens, reps: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for in_f, out_f in shapes:
        w = (torch.randn(out_f, in_f, generator=gen) * 0.02).to(device)
        w_scale = (w.abs().max() / E4M3_MAX).float()
        for m in tokens:
            x = torch.randn(m, in_f, generator=gen).to(device)
            x_scale = (x.abs().max() / E4M3_MAX).float()
            layer = FP8Linear(quantize_e4m3(w, w_scale), w_scale, x_scale)
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            xb, wb = x.to(dtype), w.to(dtype)
            real = layer.scaled_mm(xb).float()
            simulated = layer.simulate(x)
            t_fp8 = timed(lambda: layer.scaled_mm(xb), device, reps)
            t_bf16 = timed(lambda: F.linear(xb, wb), device, reps)
            flops = 2 * m * in_f * out_f
            rows.append(
                {
                    "in": in_f,
                    "out": out_f,
                    "tokens": m,
                    "max_rel_err_vs_simulation": float((real - simulated).abs().max() / simulated.abs().max()),
                    "fp8_tflops": round(flops / t_fp8 / 1e12, 2),
                    "bf16_tflops": round(flops / t_bf16 / 1e12, 2),
                    "fp8_speedup": round(t_bf16 / t_fp8, 3),
                }
            )
    return rows


def invariant(device: torch.device, max_new_tokens: int) -> dict:
    from trimode.checkpoint import load_checkpoint
    from trimode.cli import EMBEDDED_CHECKPOINT
    from trimode.decoding import GenerationSettings, Mode, generate
    from trimode.evaluate import held_out_prompts, held_out_stream

    ck = load_checkpoint(EMBEDDED_CHECKPOINT, device=device)
    prompts = held_out_prompts(held_out_stream(ck), 8, 64)
    out = {"dtype": str(ck.model.dtype)}
    for batch in (1, 8):
        equal = 0
        for i in range(0, len(prompts), batch):
            chunk = prompts[i : i + batch]
            base = dict(max_new_tokens=max_new_tokens, ignore_eos=True)
            ar = generate(ck.model, chunk, GenerationSettings(mode=Mode.AR, **base))
            spec = generate(ck.model, chunk, GenerationSettings(mode=Mode.SELF_SPEC, block_length=8, **base))
            equal += sum(a.tokens == s.tokens for a, s in zip(ar, spec))
        out[f"self_spec_equals_ar_batch_{batch}"] = f"{equal}/{len(prompts)}"
    return out


def async_steps(device: torch.device, steps: int) -> dict:
    """Four AR requests on the eager engine with async_steps: after 4 warm-up steps, the syncs torch
    reports over `steps` steps (CUDA only) and the first distinct messages; tokens vs the sync engine,
    and auto's (on async AR steps, switching modes) vs the sync engine's AR."""
    import warnings

    from trimode.checkpoint import load_checkpoint
    from trimode.cli import EMBEDDED_CHECKPOINT
    from trimode.decoding import DecodeConfig, Engine, EngineConfig, Mode, SamplingParams

    ck = load_checkpoint(EMBEDDED_CHECKPOINT, device=device)
    prompts = [ck.tokenizer.encode(t) for t in ("def main():", "import os", "class A:", "x = [1, 2")]
    tokens, syncs, messages = {}, None, []
    for is_async in (False, True):
        engine = Engine(ck.model, EngineConfig(max_slots=4, max_seq_len=256, async_steps=is_async))
        seqs = [engine.add(p, SamplingParams(steps + 16, ignore_eos=True)) for p in prompts]
        for _ in range(4):
            engine.step()
        if is_async and device.type == "cuda":
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                for _ in range(steps):
                    engine.step()
                torch.cuda.set_sync_debug_mode("default")
            syncs = len(caught)
            messages = sorted({str(w.message).splitlines()[0][:160] for w in caught})[:5]
        while engine.has_work:
            engine.step()
        tokens[is_async] = [s.tokens for s in seqs]
    engine = Engine(ck.model, EngineConfig(max_slots=4, max_seq_len=256, async_steps=True))
    auto = [engine.add(p, SamplingParams(steps + 16, ignore_eos=True), DecodeConfig(Mode.AUTO)) for p in prompts]
    while engine.has_work:
        engine.step()
    per_step = None if syncs is None else round(syncs / steps, 2)
    return {
        "syncs_per_step": per_step,
        "sync_messages": messages,
        "tokens_equal_sync": tokens[True] == tokens[False],
        "auto_tokens_equal_ar": [s.tokens for s in auto] == tokens[False],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="CPU dry run: tiny shapes, few tokens")
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "fp8_tensor_cores": gpu_has_fp8(device),
    }
    shapes = [(64, 128)] if args.small else SHAPES_8B
    tokens = (1, 16) if args.small else (1, 32, 256, 4096)
    report["fp8_gemm"] = fp8_gemm(device, shapes, tokens, reps=3 if args.small else 20)
    report["invariant"] = invariant(device, 16 if args.small else 64)
    report["async_steps"] = async_steps(device, 4 if args.small else 16)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_path:
        with open(args.json_path, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
