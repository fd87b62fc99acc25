"""Benchmark the three generation modes (AR, diffusion, self-spec) against transformers' Ministral3.

What it measures, per batch size and mode (temperature 0, ignore_eos, so every sequence emits
exactly --max-new-tokens tokens):
  * wall time of one whole `trimode.decoding.generate(...)` call (time.perf_counter; one warm-up,
    then --repeats runs, round-robin over the modes and transformers so that load from other
    processes hits all alike; tokens/s uses the best time, the median is reported too);
  * per-sequence forward passes from SequenceStats (num_passes, prefill included) and tokens per
    pass = sum(num_generated) / sum(num_passes) (the spec's counting, every pass counted), plus the
    mean over sequences of stats.tokens_per_pass;
  * batch-level forward calls: a counter wrapped around `model.forward` on the NLDModel instance
    (one call runs every active row at once), and tokens per batch forward call;
  * mean accepted length per self-speculation cycle;
  * staggered arrivals (per mode): the 8 prompts arrive one by one, spread evenly over the time one
    request takes alone; the engine admits each at its next step, against the old behaviour where
    a batch runs to completion and requests that arrive meanwhile wait for the next batch. Reported:
    makespan (first arrival to last finish), output tokens/s over it, and mean request latency.
The baseline is transformers' `Ministral3ForCausalLM.generate()` with the same weights in fp32
(greedy, LEFT padding + attention mask, min_new_tokens = max_new_tokens, EOS disabled, the mask
token suppressed as trimode does, spec §10). `ar_vs_transformers_ratio` = our AR tokens/s divided by
transformers' tokens/s at the same batch size. `ar_matches_transformers_b1` checks token equality
prompt by prompt at batch 1.

Run:   .venv/bin/python scripts/bench_modes.py --json out/bench.json
       (--checkpoint DIR, --max-new-tokens 64, --batch-sizes 1,8, --repeats 3, --threads N,
        --against-no-adapter: self-spec also without the draft adapter, timed in the same rounds)
The JSON goes to stdout (and to --json PATH); a short table goes to stderr. About 30 s on an idle
2-core CPU. On a shared box other processes distort timings badly (a descheduled OpenMP thread
stalls every GEMM): compare ratios from one run, and prefer --threads 1 there.
Random weights: the draft never agrees with the verifier (accepted length ~1) and diffusion commits
~1 token per pass, so tokens/pass and self-spec speed here measure overhead, not the paper's gains.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from trimode.bench.stats import percentile
from trimode.checkpoint import load_checkpoint
from trimode.decoding import GenerationSettings, Mode, engine_for, generate
from trimode.hf_reference import ministral3_from
from trimode.make_checkpoint import make_random_checkpoint, tiny_spec

PROMPTS = [
    "A diffusion",
    "The quick brown fox jumps over the lazy dog.",
    "def generate(prompt, max_new_tokens=32):",
    "An autoregressive model writes one token per forward pass",
    "Self-speculation drafts a block by diffusion and verifies it autoregressively in a single pass,",
    "0123456789",
    "keeping the longest prefix the verifier agrees with, plus one bonus token from the verifier itself. "
    "A diffusion language model drafts a whole block of tokens at once and refines it over a few steps.",
    "for step in range(max_new_tokens): tokens.append(model(tokens).argmax())",
]
MODES = (Mode.AR, Mode.DIFFUSION, Mode.SELF_SPEC)
NO_ADAPTER = "self-spec/no-adapter"  # --against-no-adapter's row
# Small but not toy: 4 layers, hidden 256, GQA 8/2 heads of 32, vocab 2048, block 8.
BENCH_SPEC = dict(
    vocab_size=2048,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=32,
    block_size=8,
)


def hf_ministral3(ck):
    model = ministral3_from(ck.model)  # sdpa: its default, and the kernel trimode's attention uses too
    model.generation_config.eos_token_id = None  # never stop early
    return model


def hf_generate(hf, prompts: list[list[int]], n: int, pad_id: int, mask_id: int) -> list[list[int]]:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding
        ids[i, width - len(p) :] = torch.tensor(p)
        attn[i, width - len(p) :] = 1
    out = hf.generate(
        input_ids=ids,
        attention_mask=attn,
        do_sample=False,
        max_new_tokens=n,
        min_new_tokens=n,
        pad_token_id=pad_id,
        suppress_tokens=[mask_id],
    )
    return out[:, width:].tolist()


class ForwardCounter:
    """Counts batch-level forward calls by wrapping the model instance's forward."""

    def __init__(self, model):
        self.calls, self.model, self.inner = 0, model, model.forward

        def counted(*args, **kwargs):
            self.calls += 1
            return self.inner(*args, **kwargs)

        model.forward = counted


def time_interleaved(fns: dict, repeats: int) -> dict[str, dict]:
    """Time each fn `repeats` times, round-robin, so load from other processes hits all alike.
    Every fn has had its untimed warm-up call already. Best time -> tokens/s; the median is reported too."""
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    return {
        k: {"time_s_best": round(min(t), 5), "time_s_median": round(percentile(t, 50), 5)} for k, t in times.items()
    }


def count_mode(ck, counter, prompts, settings):
    """One counted run of `generate` (it is also the warm-up): pass statistics and tokens."""
    counter.calls = 0
    results = generate(ck.model, prompts, settings)
    gen = sum(r.stats.num_generated for r in results)
    passes = sum(r.stats.num_passes for r in results)
    accepted = [a for r in results for a in r.stats.accepted_lengths]
    by_kind = Counter()
    for r in results:
        by_kind.update(r.stats.passes)
    return {
        "tokens_generated": gen,
        "seq_forward_passes": passes,
        "seq_passes_by_kind": dict(by_kind),
        "batch_forward_calls": counter.calls,
        "tokens_per_pass": round(gen / passes, 4),
        "tokens_per_pass_mean_over_seqs": round(statistics.mean(r.stats.tokens_per_pass for r in results), 4),
        "tokens_per_batch_forward_call": round(gen / counter.calls, 4),
        "mean_accepted_length": round(statistics.mean(accepted), 4) if accepted else None,
    }, [r.tokens for r in results]


def serve_staggered(ck, prompts, settings, arrivals: list[float]) -> dict:
    """The engine: a request joins the running batch at the first step after it arrives."""
    engine = engine_for(ck.model, prompts, settings)
    start, queue, live, latency = time.perf_counter(), list(zip(arrivals, prompts)), [], []
    while queue or engine.has_work:
        now = time.perf_counter() - start
        while queue and queue[0][0] <= now:
            arrival, prompt = queue.pop(0)
            live.append((arrival, engine.add(prompt, settings.sampling, settings.decoding)))
        if not engine.has_work:
            time.sleep(queue[0][0] - now)
            continue
        engine.step()
        done = time.perf_counter() - start
        latency += [done - a for a, seq in live if seq.is_finished]
        live = [(a, seq) for a, seq in live if not seq.is_finished]
    return _arrival_report(latency, time.perf_counter() - start, len(prompts) * settings.max_new_tokens)


def wait_for_batch(ck, prompts, settings, arrivals: list[float]) -> dict:
    """The old behaviour: a batch runs to completion; requests arriving meanwhile wait for the next one."""
    start, queue, latency = time.perf_counter(), list(zip(arrivals, prompts)), []
    while queue:
        now = time.perf_counter() - start
        batch = [(a, p) for a, p in queue if a <= now]
        if not batch:
            time.sleep(queue[0][0] - now)
            continue
        queue = queue[len(batch) :]
        generate(ck.model, [p for _, p in batch], settings)
        latency += [time.perf_counter() - start - a for a, _ in batch]
    return _arrival_report(latency, time.perf_counter() - start, len(prompts) * settings.max_new_tokens)


def _arrival_report(latency: list[float], makespan: float, tokens: int) -> dict:
    return {
        "makespan_s": round(makespan, 4),
        "tokens_per_s": round(tokens / makespan, 2),
        "mean_latency_s": round(statistics.mean(latency), 4),
    }


def staggered(ck, prompts, n: int, block_length: int | None) -> dict:
    """Per mode: the 8 prompts arrive evenly over the time one request takes alone."""
    out = {}
    for mode in MODES:
        settings = GenerationSettings(mode=mode, max_new_tokens=n, block_length=block_length, ignore_eos=True)
        generate(ck.model, prompts[:1], settings)  # warm-up
        start = time.perf_counter()
        generate(ck.model, prompts[:1], settings)
        alone = time.perf_counter() - start
        arrivals = [i * alone / len(prompts) for i in range(len(prompts))]
        engine, batched = (
            serve_staggered(ck, prompts, settings, arrivals),
            wait_for_batch(ck, prompts, settings, arrivals),
        )
        out[mode.value] = {
            "alone_s": round(alone, 4),
            "arrival_gap_s": round(arrivals[1], 4),
            "engine": engine,
            "wait_for_batch": batched,
            "throughput_ratio": round(engine["tokens_per_s"] / batched["tokens_per_s"], 3),
            "latency_ratio": round(engine["mean_latency_s"] / batched["mean_latency_s"], 3),
        }
    return out


def add_rates(entry: dict, timing: dict) -> dict:
    entry.update(timing)
    entry["tokens_per_s"] = round(entry["tokens_generated"] / timing["time_s_best"], 2)
    entry["tokens_per_s_median"] = round(entry["tokens_generated"] / timing["time_s_median"], 2)
    return entry


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, help="NLD checkpoint dir (default: a random one in a temp dir)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", default="1,8", help="comma-separated, each <= %d" % len(PROMPTS))
    ap.add_argument("--block-length", type=int, default=None, help="default: the checkpoint's block_size")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up (best used, median reported)")
    ap.add_argument("--json", type=Path, help="also write the JSON here")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads")
    ap.add_argument("--init-std", type=float, default=0.1, help="random checkpoint weight std (peakier logits)")
    ap.add_argument(
        "--against-no-adapter",
        action="store_true",
        help="also time self-spec with the checkpoint's draft adapter left out, in the same rounds",
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if max(batch_sizes) > len(PROMPTS) or min(batch_sizes) < 1:
        ap.error(f"--batch-sizes: each must lie in 1..{len(PROMPTS)}")

    with tempfile.TemporaryDirectory() as tmp:
        ck_dir = args.checkpoint or make_random_checkpoint(
            Path(tmp) / "bench", tiny_spec(**BENCH_SPEC), seed=0, init_std=args.init_std, with_draft_adapter=True
        )
        ck = load_checkpoint(ck_dir)
        plain = load_checkpoint(ck_dir, draft_adapter=False) if args.against_no_adapter else None
    if plain is not None and not ck.model.has_draft_adapter:
        ap.error(f"--against-no-adapter: {ck_dir} has no draft adapter")
    spec = ck.spec
    prompts = [ck.tokenizer.encode(p) for p in PROMPTS]
    counter = ForwardCounter(ck.model)
    hf = hf_ministral3(ck)
    pad_id = spec.pad_token_id if spec.pad_token_id is not None else 0
    n = args.max_new_tokens

    report = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "num_threads": torch.get_num_threads(),
            "date": datetime.datetime.now().isoformat(),
        },
        "checkpoint": {
            "dir": str(args.checkpoint) if args.checkpoint else "random (temp dir)",
            "spec": spec.to_dict(),
            "has_draft_adapter": ck.model.has_draft_adapter,
            "dtype": str(ck.model.dtype),
        },
        "settings": {
            "max_new_tokens": n,
            "block_length": args.block_length or spec.block_size,
            "repeats": args.repeats,
            "temperature": 0.0,
            "ignore_eos": True,
            "prompt_lengths": [len(p) for p in prompts],
            "batch_forward_calls_counted_by": "wrapper around NLDModel.forward on the model instance",
        },
        "results": {},
    }
    for b in batch_sizes:
        batch = prompts[:b]
        row, tokens, fns = {}, {}, {}
        for mode in MODES:
            settings = GenerationSettings(mode=mode, max_new_tokens=n, block_length=args.block_length, ignore_eos=True)
            row[mode.value], tokens[mode.value] = count_mode(ck, counter, batch, settings)
            fns[mode.value] = lambda settings=settings: generate(ck.model, batch, settings)
        if plain is not None:  # the same self-spec settings, the base model's drafts
            row[NO_ADAPTER], tokens[NO_ADAPTER] = count_mode(plain, ForwardCounter(plain.model), batch, settings)
            fns[NO_ADAPTER] = lambda settings=settings: generate(plain.model, batch, settings)
        fns["transformers"] = lambda: hf_generate(hf, batch, n, pad_id, spec.mask_token_id)
        hf_tokens = fns["transformers"]()  # its warm-up
        row["transformers"] = {"tokens_generated": sum(len(t) for t in hf_tokens)}
        for key, timing in time_interleaved(fns, args.repeats).items():
            add_rates(row[key], timing)
        row["ar_vs_transformers_ratio"] = round(row["ar"]["tokens_per_s"] / row["transformers"]["tokens_per_s"], 3)
        row["ar_vs_transformers_ratio_median"] = round(
            row["ar"]["tokens_per_s_median"] / row["transformers"]["tokens_per_s_median"], 3
        )
        row["ar_matches_transformers_in_batch"] = [a == h for a, h in zip(tokens["ar"], hf_tokens)]
        row["self_spec_matches_ar"] = [s == a for s, a in zip(tokens["self-spec"], tokens["ar"])]
        row["self_spec_vs_ar_ratio"] = round(row["self-spec"]["tokens_per_s"] / row["ar"]["tokens_per_s"], 3)
        if plain is not None:
            row["self_spec_no_adapter_matches_ar"] = [s == a for s, a in zip(tokens[NO_ADAPTER], tokens["ar"])]
            row["self_spec_no_adapter_vs_ar_ratio"] = round(
                row[NO_ADAPTER]["tokens_per_s"] / row["ar"]["tokens_per_s"], 3
            )
        report["results"][f"batch_{b}"] = row

    # Token equality at batch 1, prompt by prompt (the greedy-equivalence check).
    ar1 = GenerationSettings(mode=Mode.AR, max_new_tokens=n, ignore_eos=True)
    match = [
        generate(ck.model, [p], ar1)[0].tokens == hf_generate(hf, [p], n, pad_id, spec.mask_token_id)[0]
        for p in prompts
    ]
    report["ar_matches_transformers_b1"] = match
    report["ar_matches_transformers_b1_fraction"] = sum(match) / len(match)
    report["ar_vs_transformers_ratio"] = {k: v["ar_vs_transformers_ratio"] for k, v in report["results"].items()}
    report["staggered_arrivals"] = staggered(ck, prompts, n, args.block_length)

    print_table(report)
    write_report(report, args.json)
    return 0


def mode_ratios(row: dict, numerator: str, denominator: str) -> dict[str, float]:
    """Per mode the row measured, tokens/s of row["<mode>/<numerator>"] over row["<mode>/<denominator>"]
    (same run)."""
    return {
        m.value: round(
            row[f"{m.value}/{numerator}"]["tokens_per_s"] / row[f"{m.value}/{denominator}"]["tokens_per_s"], 3
        )
        for m in Mode
        if f"{m.value}/{numerator}" in row
    }


def write_report(report: dict, path: Path | None) -> None:
    """The benchmark scripts' output: the JSON on stdout, and in `path` when given."""
    text = json.dumps(report, indent=2)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    print(text)


def print_table(report) -> None:
    err = sys.stderr
    m = report["machine"]
    print(
        f"# {m['platform']} torch {m['torch']} threads {m['num_threads']}  "
        f"max_new_tokens {report['settings']['max_new_tokens']}",
        file=err,
    )
    print(
        f"{'batch':>5} {'mode':<20} {'tok/s':>9} {'seq passes':>10} {'tok/pass':>8} "
        f"{'batch fwd':>9} {'tok/fwd':>8} {'accept':>6}",
        file=err,
    )
    for key, row in report["results"].items():
        b = key.split("_")[1]
        for mode in ("ar", "diffusion", "self-spec", NO_ADAPTER):
            if mode not in row:
                continue
            r = row[mode]
            acc = f"{r['mean_accepted_length']:.2f}" if r["mean_accepted_length"] else "-"
            print(
                f"{b:>5} {mode:<20} {r['tokens_per_s']:>9.1f} {r['seq_forward_passes']:>10} "
                f"{r['tokens_per_pass']:>8.3f} {r['batch_forward_calls']:>9} "
                f"{r['tokens_per_batch_forward_call']:>8.3f} {acc:>6}",
                file=err,
            )
        print(
            f"{b:>5} {'transformers':<20} {row['transformers']['tokens_per_s']:>9.1f}   "
            f"AR/transformers = {row['ar_vs_transformers_ratio']:.3f}  "
            f"AR==HF in batch: {sum(row['ar_matches_transformers_in_batch'])}/{len(row['ar_matches_transformers_in_batch'])}  "
            f"self-spec==AR: {sum(row['self_spec_matches_ar'])}/{len(row['self_spec_matches_ar'])}",
            file=err,
        )
    print(
        f"AR == transformers greedy at batch 1: {report['ar_matches_transformers_b1_fraction']:.0%} of prompts",
        file=err,
    )
    print(f"staggered arrivals of {len(PROMPTS)} requests: engine vs wait-for-the-batch", file=err)
    for mode, r in report["staggered_arrivals"].items():
        print(
            f"  {mode:<10} tok/s {r['engine']['tokens_per_s']:>8.1f} vs {r['wait_for_batch']['tokens_per_s']:>8.1f} "
            f"(x{r['throughput_ratio']:.2f})  mean latency {r['engine']['mean_latency_s']:.3f}s vs "
            f"{r['wait_for_batch']['mean_latency_s']:.3f}s (x{r['latency_ratio']:.2f})",
            file=err,
        )


if __name__ == "__main__":
    sys.exit(main())
