"""Benchmark the paged KV pool: how many requests one memory budget runs at once, and what the
prefix cache saves.

Two measurements on one checkpoint (default: the embedded one), eager, at temperature 0:
  * admission: --requests requests (prompt and output lengths drawn uniformly from 16-256, fixed
    seed), all queued at once, on an engine with max_seq_len --max-seq-len and a KV budget of
    --budget-seqs sequences of max_seq_len; once with dense slots (block size = max_seq_len: the
    budget is --budget-seqs slots) and once paged (--block-size). admitted_* is the most requests
    holding KV at once over the run (the paged engine preempts when its blocks run dry; the
    number of preemptions is reported); tokens of both runs are compared.
  * prefix: --prefix-requests requests of one --prefix-len token prefix plus a short suffix of
    their own, one at a time (time to first token is a request's own), after one request that
    warms the cache: with the prefix cache and without. prefix_prefill_tokens_saved is the
    fraction of prefill tokens not computed; prefix_ttft_ratio is the median TTFT without the
    cache over the median with it. Tokens with and without are compared.
tokens_equal: paged == dense and cached == uncached, for every request.
Run:   .venv/bin/python scripts/bench_kv.py --json out/bench_kv.json
The JSON goes to stdout and --json, a summary to stderr.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_modes import write_report  # noqa: E402

from trimode.checkpoint import load_checkpoint  # noqa: E402
from trimode.cli import EMBEDDED_CHECKPOINT  # noqa: E402
from trimode.decoding import DecodeConfig, Engine, EngineConfig, Mode, SamplingParams  # noqa: E402
from trimode.kv_cache import block_bytes  # noqa: E402


def workload(vocab: int, num: int, low: int, high: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """(prompt, max_new_tokens) pairs: lengths uniform in [low, high], token ids away from specials."""
    rng = random.Random(seed)
    return [
        ([rng.randrange(8, vocab) for _ in range(rng.randint(low, high))], rng.randint(low, high)) for _ in range(num)
    ]


def run_all(ck, config: EngineConfig, requests: list[tuple[list[int], int]]) -> dict:
    """Queue every request, step to the end; -> the most requests holding KV at once, tokens, preemptions."""
    engine = Engine(ck.model, config)
    seqs = [engine.add(p, SamplingParams(n, ignore_eos=True), DecodeConfig(Mode.AR)) for p, n in requests]
    peak, steps, began = 0, 0, time.perf_counter()
    while engine.has_work:
        engine.step()
        peak, steps = max(peak, len(engine.running)), steps + 1
    return {
        "admitted": peak,
        "steps": steps,
        "seconds": round(time.perf_counter() - began, 2),
        "preemptions": engine.num_preemptions,
        "num_kv_blocks": engine.runner.cache.num_blocks,
        "kv_block_size": engine.runner.cache.block_size,
        "kv_bytes": engine.runner.cache.num_bytes,
        "tokens": [s.tokens for s in seqs],
    }


def run_prefix(ck, config: EngineConfig, warm: list[int], prompts: list[list[int]], max_new: int) -> dict:
    """One request to warm the cache, then each prompt alone: its TTFT and the prefill tokens computed."""
    engine = Engine(ck.model, config)
    first = engine.add(warm, SamplingParams(max_new, ignore_eos=True), DecodeConfig(Mode.AR))
    while engine.has_work:
        engine.step()
    ttfts, computed, tokens = [], 0, [first.tokens]
    for prompt in prompts:
        seq = engine.add(prompt, SamplingParams(max_new, ignore_eos=True), DecodeConfig(Mode.AR))
        began = time.perf_counter()
        while not seq.tokens:
            engine.step()
        ttfts.append(time.perf_counter() - began)
        while engine.has_work:
            engine.step()
        computed += len(prompt) - seq.stats.num_cached_tokens
        tokens.append(seq.tokens)
    return {"ttft_median_ms": round(statistics.median(ttfts) * 1e3, 3), "prefill_computed": computed, "tokens": tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=EMBEDDED_CHECKPOINT)
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--budget-seqs", type=int, default=8, help="the KV budget, in sequences of max_seq_len")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--prefix-len", type=int, default=256)
    ap.add_argument("--prefix-requests", type=int, default=32)
    ap.add_argument("--suffix-len", type=int, default=8)
    ap.add_argument("--prefix-new-tokens", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.min_len <= args.max_len or args.min_len < 1:
        ap.error("--min-len must be >= 1 and at most --max-len")
    if 2 * args.max_len + args.block_size > args.max_seq_len:
        ap.error("--max-seq-len must hold a prompt and an output of --max-len and a block")
    ck = load_checkpoint(args.checkpoint)
    spec, dtype = ck.model.spec, ck.model.kv_dtype

    # admission: one budget, dense slots vs blocks
    budget = (args.budget_seqs + 1) * block_bytes(spec, args.max_seq_len, dtype)  # + the null block
    paged_blocks = budget // block_bytes(spec, args.block_size, dtype) - 1
    requests = workload(spec.vocab_size, args.requests, args.min_len, args.max_len)
    base = dict(max_slots=args.requests, max_seq_len=args.max_seq_len)
    dense = run_all(ck, EngineConfig(**base, kv_block_size=args.max_seq_len, num_kv_blocks=args.budget_seqs), requests)
    paged = run_all(ck, EngineConfig(**base, kv_block_size=args.block_size, num_kv_blocks=paged_blocks), requests)

    # prefix: one shared prefix, a suffix each
    rng = random.Random(1)
    prefix = [rng.randrange(8, spec.vocab_size) for _ in range(args.prefix_len)]
    prompts = [
        prefix + [rng.randrange(8, spec.vocab_size) for _ in range(args.suffix_len)]
        for _ in range(args.prefix_requests + 1)
    ]
    seq_len = args.prefix_len + args.suffix_len + args.prefix_new_tokens + args.block_size
    config = dict(max_slots=2, max_seq_len=seq_len, kv_block_size=args.block_size)
    # round robin, best of 2: load from other jobs hits both alike
    hits = run_prefix(ck, EngineConfig(**config), prompts[0], prompts[1:], args.prefix_new_tokens)
    cold = run_prefix(
        ck, EngineConfig(**config, enable_prefix_caching=False), prompts[0], prompts[1:], args.prefix_new_tokens
    )
    hits2 = run_prefix(ck, EngineConfig(**config), prompts[0], prompts[1:], args.prefix_new_tokens)
    cold2 = run_prefix(
        ck, EngineConfig(**config, enable_prefix_caching=False), prompts[0], prompts[1:], args.prefix_new_tokens
    )
    ttft_hit = min(hits["ttft_median_ms"], hits2["ttft_median_ms"])
    ttft_cold = min(cold["ttft_median_ms"], cold2["ttft_median_ms"])

    tokens_equal = dense["tokens"] == paged["tokens"] and hits["tokens"] == cold["tokens"]
    report = {
        "admitted_dense": dense["admitted"],
        "admitted_paged": paged["admitted"],
        "admitted_ratio": round(paged["admitted"] / dense["admitted"], 2),
        "prefix_prefill_tokens_saved": round(1 - hits["prefill_computed"] / cold["prefill_computed"], 4),
        "prefix_ttft_ratio": round(ttft_cold / ttft_hit, 2),
        "tokens_equal": tokens_equal,
        "admission": {
            name: {k: v for k, v in r.items() if k != "tokens"} for name, r in (("dense", dense), ("paged", paged))
        }
        | {"kv_budget_bytes": budget, "requests": args.requests, "lengths": [args.min_len, args.max_len]},
        "prefix": {
            "prefix_len": args.prefix_len,
            "suffix_len": args.suffix_len,
            "requests": args.prefix_requests,
            "prefill_computed_cached": hits["prefill_computed"],
            "prefill_computed_uncached": cold["prefill_computed"],
            "ttft_median_ms_cached": ttft_hit,
            "ttft_median_ms_uncached": ttft_cold,
        },
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "num_threads": torch.get_num_threads(),
            "date": datetime.date.today().isoformat(),
        },
    }
    print(
        f"admitted at once: dense {report['admitted_dense']}, paged {report['admitted_paged']} "
        f"({report['admitted_ratio']}x, {paged['preemptions']} preemptions); prefix: "
        f"{report['prefix_prefill_tokens_saved']:.0%} prefill tokens saved, TTFT {ttft_cold} -> {ttft_hit} ms "
        f"({report['prefix_ttft_ratio']}x); tokens equal: {tokens_equal}",
        file=sys.stderr,
    )
    write_report(report, args.json)


if __name__ == "__main__":
    main()
