"""Per-pass wall time of one or more engine dirs at batch 1, interleaved in one process so that every
engine sees the same machine noise (compare engines, and block pass / decode pass, within one run).

Each round runs decode (L = 1) and the denoise, draft and verify passes (L = block length) of every
engine once, on pool row 0 holding 64 cached tokens, through ModelRunner.run as
scripts/bench_engine.py times them; prints min and 25th percentile (ms) over --rounds.

Run:   .venv/bin/python scripts/bench_passes.py ENGINE_A [ENGINE_B ...] --threads 1 --rounds 400
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from trimode.builder.engine_dir import load_engine
from trimode.decoding.runner import ModelRunner
from trimode.passes import PassKind

CACHED = 64


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("engines", type=Path, nargs="+")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=400)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    runners, times = {}, {}
    for d in args.engines:
        built = load_engine(d)
        runner = ModelRunner(built.checkpoint.model, built.config.max_slots, built.config.max_seq_len, built.backend)
        runner.host_lengths[0] = CACHED
        runner.cache.lengths[0] = CACHED
        L, vocab = built.block_lengths[0], built.checkpoint.spec.vocab_size
        passes = {"decode": (PassKind.DECODE, 1), "denoise": (PassKind.DENOISE, L), "draft": (PassKind.DRAFT, L),
                  "verify": (PassKind.VERIFY, L)}
        tokens = {n: torch.randint(5, vocab, (1, n), generator=torch.Generator().manual_seed(0)) for n in (1, L)}
        runners[d] = (runner, [(name, kind, tokens[n]) for name, (kind, n) in passes.items()])
        times[d] = {name: [] for name in passes}
    for _ in range(args.rounds + 1):  # the first round warms up
        for d, (runner, passes) in runners.items():
            for name, kind, tokens in passes:
                start = time.perf_counter()
                runner.run(kind, tokens, [0])
                times[d][name].append(time.perf_counter() - start)
    for d, by_pass in times.items():
        q = {name: (min(t[1:]) * 1e3, sorted(t[1:])[len(t[1:]) // 4] * 1e3) for name, t in by_pass.items()}
        print(f"{d} threads={args.threads} (min / p25 ms): "
              + "  ".join(f"{name} {lo:.3f} / {p25:.3f}" for name, (lo, p25) in q.items()))
        print("  block pass / decode pass (min / p25): "
              + "  ".join(f"{name} {q[name][0] / q['decode'][0]:.2f} / {q[name][1] / q['decode'][1]:.2f}"
                          for name in q if name != "decode"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
