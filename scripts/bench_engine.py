"""Benchmark a built engine dir against the eager runtime and transformers, in one run.

Per batch size (default 1 and 8), all at temperature 0 with ignore_eos:
  * per-pass wall time of each program the modes call (prefill chunk of 32, AR decode L=1, and the
    denoise / draft / verify passes at the engine's block length), engine vs eager, over a pool
    whose rows hold 64 cached tokens; and the block-pass / decode-pass cost ratio on the engine;
  * tokens/s of a whole `generate` per mode (ar, diffusion, self-spec) on the engine and on the
    eager reference, and of transformers' `generate()` (AR, same weights) as the outside baseline;
    round-robin timing (scripts/bench_modes.time_interleaved), best of --repeats after a warm-up;
  * token equality: engine == eager in every mode; self-spec == AR.
Ratios are what to read (this machine is shared and noisy): engine/eager per mode, engine AR /
transformers, block pass / decode pass.
  * --compare OTHER_ENGINE_DIR (repeatable): other engines of the same checkpoint timed in the same
    round-robin, each under its backend's name (e.g. an onnx engine next to a torch one): tokens/s per
    mode, their ratio to eager and their token equality with eager.

Run:   .venv/bin/python scripts/bench_engine.py --engine ENGINE_DIR --json out/bench_engine.json
       (no --engine: builds one from --checkpoint, default the embedded one, into a temp dir)
       --compare ENGINE_DIR2: that engine's generate in the same run (`<mode>/<backend>` rows)
       --threads 1 is the fair setting on a box with other load (a descheduled OpenMP thread stalls
       every GEMM); the JSON goes to stdout and --json, a table to stderr.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_modes import PROMPTS, add_rates, hf_generate, hf_ministral3, mode_ratios, time_interleaved, write_report  # noqa: E402

from trimode.builder import BuildSettings, build_engine  # noqa: E402
from trimode.builder.engine_dir import load_engine  # noqa: E402
from trimode.decoding import Engine, GenerationSettings, Mode, generate  # noqa: E402
from trimode.decoding.runner import ModelRunner  # noqa: E402
from trimode.passes import PassKind  # noqa: E402

CACHED = 64  # tokens already in each row when a pass is timed
PREFILL_LEN = 32


def time_pass(runner: ModelRunner, kind: PassKind, b: int, L: int, repeats: int) -> float:
    """Best-of wall time (ms) of one pass of `kind` over rows 0..b-1, each holding CACHED tokens."""
    tokens = torch.randint(5, runner.model.spec.vocab_size, (b, L), generator=torch.Generator().manual_seed(0))
    slots = list(range(b))
    best = float("inf")
    for _ in range(repeats + 1):
        start = time.perf_counter()
        runner.run(kind, tokens, slots)
        best = min(best, time.perf_counter() - start)
    return round(best * 1e3, 3)


def prefill_len(built) -> int:
    return min(PREFILL_LEN, built.config.prefill_chunk)  # an engine built with a shorter --max-input-len


def pass_times(built, b: int, repeats: int) -> dict:
    model, L = built.checkpoint.model, built.block_lengths[0]
    runners = {  # the engine's pool for both: its programs take that pool's shape
        "engine": ModelRunner(model, built.config, built.backend),
        "eager": ModelRunner(model, built.config),
    }
    shapes = {
        "prefill": (PassKind.PREFILL, prefill_len(built)),
        "decode": (PassKind.DECODE, 1),
        "denoise": (PassKind.DENOISE, L),
        "draft": (PassKind.DRAFT, L),
        "verify": (PassKind.VERIFY, L),
    }
    out = {}
    longest = min(CACHED + max(n for _, n in shapes.values()), built.config.max_seq_len)
    for name, runner in runners.items():
        num = -(-longest // runner.cache.block_size)  # blocks per row: its cached tokens and the chunk
        for slot in range(b):  # rows 0..b-1 seated by hand on blocks of their own (no BlockManager here)
            runner.set_blocks(slot, list(range(slot * num, (slot + 1) * num)))
            runner.host_lengths[slot] = CACHED
            runner.cache.lengths[slot] = CACHED
        out[name] = {
            f"{kind_name}_ms": time_pass(runner, kind, b, n, repeats) for kind_name, (kind, n) in shapes.items()
        }
    for kind_name in shapes:
        out.setdefault("speedup", {})[kind_name] = round(
            out["eager"][f"{kind_name}_ms"] / out["engine"][f"{kind_name}_ms"], 3
        )
    out["engine_block_pass_vs_decode"] = round(out["engine"]["verify_ms"] / out["engine"]["decode_ms"], 3)
    return out


def compared_engines(built, dirs: list[Path]) -> dict:
    """{label: BuiltEngine} for --compare: each engine's backend name ("engine" and "eager" are
    taken), with its pool when two share a backend. Each must be of the same checkpoint."""
    others: dict = {}
    for path in dirs:
        other = load_engine(path)
        if other.manifest["input"]["digest_sha256"] != built.manifest["input"]["digest_sha256"]:
            raise SystemExit(f"--compare {path}: built from another checkpoint than --engine")
        s = other.manifest["settings"]
        label = s["backend"]
        if label in others or label in ("engine", "eager"):
            label += f"_{s['max_batch_size']}x{s['max_seq_len']}"
        others[label] = other
    return others


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", type=Path, help="a built engine dir (default: build one into a temp dir)")
    ap.add_argument("--checkpoint", type=Path, help="what to build when --engine is not given (default: embedded)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pass-repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, help="torch.set_num_threads")
    ap.add_argument("--json", type=Path, help="also write the JSON here")
    ap.add_argument(
        "--compare", type=Path, action="append", default=[], help="another engine dir to time in the same run"
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        engine_dir = args.engine
        if engine_dir is None:
            from trimode.cli import EMBEDDED_CHECKPOINT

            engine_dir = Path(tmp) / "engine"
            build_engine(
                args.checkpoint or EMBEDDED_CHECKPOINT,
                engine_dir,
                BuildSettings(max_batch_size=max(batch_sizes), max_seq_len=512, max_input_len=128),
            )
        built = load_engine(engine_dir)
    others = compared_engines(built, args.compare)
    ck, n = built.checkpoint, args.max_new_tokens
    max_slots = min([built.config.max_slots] + [o.config.max_slots for o in others.values()])
    if max(batch_sizes) > min(len(PROMPTS), max_slots):
        ap.error(f"--batch-sizes: at most {min(len(PROMPTS), max_slots)} for these engines")
    prompts = [ck.tokenizer.encode(p) for p in PROMPTS]
    # transformers has no loader for ModelOpt's FP8 checkpoints here: an FP8 engine gets no transformers column
    hf = hf_ministral3(ck) if built.manifest.get("quantization") is None else None
    pad_id = ck.spec.pad_token_id if ck.spec.pad_token_id is not None else 0
    report = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "num_threads": torch.get_num_threads(),
            "date": datetime.datetime.now().isoformat(),
        },
        "engine": {
            "dir": str(args.engine or "built into a temp dir"),
            "settings": built.manifest["settings"],
            "dtype": built.manifest["model"]["dtype"],
        },
        "compared": {
            label: {"dir": str(o.path), "settings": o.manifest["settings"], "graph": o.manifest["backend"].get("graph")}
            for label, o in others.items()
        },
        "settings": {
            "max_new_tokens": n,
            "repeats": args.repeats,
            "cached_tokens_per_row": CACHED,
            "prefill_len": prefill_len(built),
            "block_length": built.block_lengths[0],
        },
        "results": {},
    }
    for b in batch_sizes:
        batch, row, fns, tokens = prompts[:b], {"passes": pass_times(built, b, args.pass_repeats)}, {}, {}
        for mode in Mode:
            settings = GenerationSettings(
                mode=mode, max_new_tokens=n, block_length=built.block_lengths[0], ignore_eos=True
            )
            for backend in ("engine", "eager"):

                def run(settings=settings, backend=backend):
                    engine = built.new_engine() if backend == "engine" else Engine(ck.model, built.config)
                    return generate(ck.model, batch, settings, engine)

                seqs = run()  # the warm-up, and the tokens
                tokens[f"{mode.value}/{backend}"] = [s.tokens for s in seqs]
                row[f"{mode.value}/{backend}"] = {"tokens_generated": sum(s.stats.num_generated for s in seqs)}
                fns[f"{mode.value}/{backend}"] = run
            for label, other in others.items():

                def run_other(settings=settings, other=other):
                    return generate(other.checkpoint.model, batch, settings, other.new_engine())

                seqs = run_other()
                tokens[f"{mode.value}/{label}"] = [s.tokens for s in seqs]
                row[f"{mode.value}/{label}"] = {"tokens_generated": sum(s.stats.num_generated for s in seqs)}
                fns[f"{mode.value}/{label}"] = run_other
        if hf is not None:
            fns["transformers"] = lambda: hf_generate(hf, batch, n, pad_id, ck.spec.mask_token_id)
            row["transformers"] = {"tokens_generated": sum(len(t) for t in fns["transformers"]())}
        for key, timing in time_interleaved(fns, args.repeats).items():
            add_rates(row[key], timing)
        row["engine_vs_eager"] = mode_ratios(row, "engine", "eager")
        if hf is not None:
            row["engine_ar_vs_transformers"] = round(
                row["ar/engine"]["tokens_per_s"] / row["transformers"]["tokens_per_s"], 3
            )
        row["engine_equals_eager"] = {m.value: tokens[f"{m.value}/engine"] == tokens[f"{m.value}/eager"] for m in Mode}
        for label in others:
            row[f"{label}_vs_eager"] = mode_ratios(row, label, "eager")
            row[f"{label}_equals_eager"] = {
                m.value: tokens[f"{m.value}/{label}"] == tokens[f"{m.value}/eager"] for m in Mode
            }
        row["self_spec_equals_ar"] = tokens["self-spec/engine"] == tokens["ar/engine"]
        report["results"][f"batch_{b}"] = row
    print_table(report)
    write_report(report, args.json)
    return 0


def print_table(report: dict) -> None:
    err = sys.stderr
    for key, row in report["results"].items():
        p = row["passes"]
        print(f"{key}: per pass (ms) engine {p['engine']} | eager {p['eager']}", file=err)
        print(
            f"  pass speedup {p['speedup']}; engine block pass / decode pass {p['engine_block_pass_vs_decode']}",
            file=err,
        )
        for m in Mode:
            print(
                f"  {m.value:<10} tokens/s engine {row[f'{m.value}/engine']['tokens_per_s']:>8} "
                f"eager {row[f'{m.value}/eager']['tokens_per_s']:>8}  x{row['engine_vs_eager'][m.value]}"
                f"  same tokens {row['engine_equals_eager'][m.value]}",
                file=err,
            )
        for label in (k[: -len("_vs_eager")] for k in row if k.endswith("_vs_eager") and k != "engine_vs_eager"):
            print(
                f"  {label}: "
                + ", ".join(
                    f"{m.value} {row[f'{m.value}/{label}']['tokens_per_s']} x{row[f'{label}_vs_eager'][m.value]}"
                    f"{'' if row[f'{label}_equals_eager'][m.value] else ' (TOKENS DIFFER)'}"
                    for m in Mode
                ),
                file=err,
            )
        if "transformers" in row:
            print(
                f"  transformers {row['transformers']['tokens_per_s']} tokens/s; engine AR / transformers "
                f"{row['engine_ar_vs_transformers']}",
                file=err,
            )
        print(f"  self-spec == AR {row['self_spec_equals_ar']}", file=err)


if __name__ == "__main__":
    sys.exit(main())
