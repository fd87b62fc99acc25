"""A bench report as people read it: the table, the advice, the plot, and the output folder.

The folder (`--out DIR`) is written through `stage_output` like every trimode output: all of it or
nothing, an existing one replaced only with force (and only a previous bench output):

    DIR/bench.json      the report, as `--json` prints it
    DIR/bench.png       tokens/s and speed-up over AR vs concurrency, one line per variant
    DIR/manifest.json   stage "bench"
"""

from __future__ import annotations

import json
from pathlib import Path

from trimode.errors import MissingDependencyError
from trimode.stage_output import stage_output, write_manifest

STAGE = "bench"


def format_table(report: dict) -> str:
    t, s = report["target"], report["settings"]
    where = t.get("engine_dir") or f"{t['url']} ({t.get('protocol', t['kind'])})"
    m = report["machine"]
    spread = s["num_rounds"] > 1
    lines = [
        f"{where}: {s['max_tokens']} tokens per request, temperature 0, {m['cpu']} ({m['num_cpus']} CPUs)"
        + (f", tok/s: median of {s['num_rounds']} rounds (min-max)" if spread else ""),
        f"{'variant':<14}{'conc':>5}{'reqs':>6}{'tok/s':>9}{f'{chr(32) * 7}min-max' if spread else ''}{'vs AR':>7}"
        f"{'tok/pass':>9}{'accept':>7}{'in pass':>8}{'TTFT p50':>10}{'p95':>8}{'lat p50':>9}{'p95':>8}",
    ]
    for r in report["results"]:

        def opt(v, fmt):
            return "-" if v is None else format(v, fmt)

        rounds = r["tokens_per_s_rounds"]
        span = f"{f'{min(rounds):.0f}-{max(rounds):.0f}':>14}" if spread else ""
        lines.append(
            f"{r['variant']:<14}{r['concurrency']:>5}{r['num_requests']:>6}{r['tokens_per_s']:>9.1f}{span}"
            f"{opt(r['speedup_vs_ar'], '.2f'):>7}{opt(r['tokens_per_pass'], '.2f'):>9}"
            f"{opt(r['mean_accepted_length'], '.2f'):>7}{opt(r['pass_efficiency'], '.0%'):>8}"
            f"{r['ttft_s']['p50']:>10.3f}{r['ttft_s']['p95']:>8.3f}"
            f"{r['latency_s']['p50']:>9.3f}{r['latency_s']['p95']:>8.3f}"
        )
    lines += [f"note: {n}" for n in report["notes"]]
    lines.append("advice (fastest by output tokens/s, this engine on this machine):")
    lines += [f"  {a['text']}" for a in report["advice"]]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Two panels over concurrency (log2 axis): output tokens/s, and speed-up over AR."""
    try:
        import matplotlib
    except ImportError:
        raise MissingDependencyError("matplotlib", "bench") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    levels = sorted({r["concurrency"] for r in rows})
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = sorted((r for r in rows if r["variant"] == name), key=lambda r: r["concurrency"])
        xs = [r["concurrency"] for r in mine]
        left.plot(xs, [r["tokens_per_s"] for r in mine], marker="o", label=name)
        if all(r["speedup_vs_ar"] is not None for r in mine):
            right.plot(xs, [r["speedup_vs_ar"] for r in mine], marker="o", label=name)
    right.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    for ax, label in ((left, "output tokens/s"), (right, "speed-up over AR (same run)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrency (clients, closed loop)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    t = report["target"]
    fig.suptitle(
        f"trimode bench: {t.get('engine_dir') or t.get('url')}, {report['settings']['max_tokens']} tokens "
        f"per request ({report['machine']['cpu']}, {report['date'][:10]})",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_bench_dir(report: dict, out_dir: Path, force: bool = False) -> Path:
    with stage_output(out_dir, STAGE, force=force) as tmp:
        (tmp / "bench.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
        plot(report, tmp / "bench.png")
        write_manifest(
            tmp,
            {
                "stage": STAGE,
                "tool": report["tool"],
                "date": report["date"],
                "target": report["target"],
                "files": ["bench.json", "bench.png"],
            },
        )
    return Path(out_dir)
