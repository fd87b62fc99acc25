"""Benchmark the engine's host work per step: the time a step spends outside its forward passes.

A built engine dir runs `Engine.step` to the end of --requests rounds of b identical requests per
mode and batch size (greedy, ignore_eos, --max-tokens each), after one untimed round; the runner's
pass clock gives the time inside passes. Per (mode, b): steps, microseconds per step, the share in
passes (`in_pass`) and the host microseconds per step beside them (`host_us`: scheduling, input
tensors, sampling, the one fetch, bookkeeping). No server and no loop thread: this is the part of
a served step the engine itself owns (`trimode bench` measures the whole served share).
Each (mode, b) runs --repeats times round-robin; the row is the round with the fewest host us.
Run:   .venv/bin/python scripts/bench_host.py --engine ENGINE_DIR --json out/bench_host.json
The JSON goes to stdout and --json, a table to stderr.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_modes import write_report  # noqa: E402

from trimode.builder.engine_dir import load_engine  # noqa: E402
from trimode.decoding import DecodeConfig, Mode, SamplingParams  # noqa: E402
from trimode.errors import TrimodeError  # noqa: E402

PROMPT = [1, 2, 3, 4, 5, 6, 7, 8] * 4  # 32 tokens; the same for every request (no sampling involved)


def rounds(engine, mode: Mode, batch: int, requests: int, max_tokens: int) -> dict:
    """`requests` rounds of `batch` requests added together and stepped to their end (the engine's
    first block length)."""
    params, decoding = SamplingParams(max_tokens, ignore_eos=True), DecodeConfig(mode, engine.block_lengths[0])
    steps, clock = 0, engine.runner.clock
    in_pass, began = clock.seconds, time.perf_counter()
    for _ in range(requests):
        for _ in range(batch):
            engine.add(PROMPT, params, decoding)
        while engine.has_work:
            engine.step()
            steps += 1
    wall, in_pass = time.perf_counter() - began, clock.seconds - in_pass
    return {
        "steps": steps,
        "us_per_step": round(wall / steps * 1e6, 1),
        "in_pass": round(in_pass / wall, 4),
        "host_us": round((wall - in_pass) / steps * 1e6, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", type=Path, required=True, help="a built engine dir (trimode build)")
    ap.add_argument("--modes", default="ar,self-spec,diffusion")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--requests", type=int, default=8, help="rounds of b requests per measurement")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        modes = [Mode(m) for m in args.modes.split(",")]
        sizes = [int(b) for b in args.batch_sizes.split(",")]
        built = load_engine(args.engine)
    except (ValueError, TrimodeError) as e:
        ap.error(str(e))
    if max(sizes) > built.config.max_slots:
        ap.error(f"--batch-sizes: this engine has {built.config.max_slots} slots")
    engine = built.new_engine()
    cells = [(mode, b) for mode in modes for b in sizes]
    for mode, b in cells:  # warm-up: every program once
        rounds(engine, mode, b, 1, args.max_tokens)
    runs: dict[tuple, list[dict]] = {cell: [] for cell in cells}
    for _ in range(args.repeats):
        for mode, b in cells:
            runs[mode, b].append(rounds(engine, mode, b, args.requests, args.max_tokens))
    results = [{"mode": m.value, "batch": b, **min(runs[m, b], key=lambda r: r["host_us"])} for m, b in cells]
    report = {
        "tool": "scripts/bench_host.py",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__},
        "settings": {**{k: str(v) for k, v in vars(args).items()}, "engine": str(args.engine)},
        "results": results,
    }
    print(f"{'mode':<10} {'b':>3} {'steps':>6} {'us/step':>9} {'in pass':>8} {'host us':>8}", file=sys.stderr)
    for r in results:
        print(
            f"{r['mode']:<10} {r['batch']:>3} {r['steps']:>6} {r['us_per_step']:>9.0f} "
            f"{r['in_pass']:>8.1%} {r['host_us']:>8.0f}",
            file=sys.stderr,
        )
    write_report(report, args.json)


if __name__ == "__main__":
    main()
