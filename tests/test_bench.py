"""trimode bench: the statistics alone, a bench in process on the tiny engine, one against a real
tritonserver over the same engine (one server for the module), and bad input refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from trimode.bench.prompts import held_out_prompts, read_prompts
from trimode.bench.runner import BenchSettings, run_bench
from trimode.bench.stats import Record, add_speedups, advise, percentile, summarize
from trimode.bench.targets import BenchError, Update
from trimode.cli import EMBEDDED_CHECKPOINT, main
from trimode.errors import InputError
from trimode.triton_repo.server import Ports, TritonServer
from trimode.triton_repo.writer import write_model_repo

# short (tiny engine: prefill chunk 16, max_seq_len 96): every prompt is prefilled in one pass
PROMPTS = ["def f(x):", "import os", "class A:", "x = [1, 2"]
MAX_TOKENS = 8
PNG = b"\x89PNG\r\n\x1a\n"


# ---- statistics ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values, q, expected",
    [
        ([1, 2, 3, 4], 50, 2.5),
        ([4, 1, 3, 2], 0, 1),
        ([4, 1, 3, 2], 100, 4),
        ([7], 95, 7),
        ([1, 2], 95, 1.95),
        ([10, 20, 30], 25, 15),
        (list(range(101)), 95, 95),
    ],
)
def test_percentile(values, q, expected):
    assert percentile(values, q) == pytest.approx(expected)


@pytest.mark.parametrize("values, q", [([], 50), ([1], -1), ([1], 101)])
def test_percentile_refuses(values, q):
    with pytest.raises(ValueError):
        percentile(values, q)


def test_summarize_one_cell():
    records = [Record(0.0, 0.1, 1.0, 8, 8, None), Record(0.0, 0.3, 2.0, 8, 4, None), Record(1.0, 1.2, 4.0, 8, 6, None)]
    cell = summarize([(records, 4.0, None)])
    assert cell["num_output_tokens"] == 24 and cell["tokens_per_s"] == 6.0 and cell["requests_per_s"] == 0.75
    assert cell["tokens_per_pass"] == pytest.approx(24 / 18, abs=1e-4)
    assert cell["ttft_s"]["p50"] == pytest.approx(0.2) and cell["latency_s"]["p50"] == pytest.approx(2.0)
    assert cell["latency_s"]["p95"] == pytest.approx(2.9) and cell["mean_accepted_length"] is None
    unknown = summarize([([Record(0.0, 0.1, 1.0, 8, None, 2.5)], 1.0, None)])
    assert unknown["tokens_per_pass"] is None and unknown["mean_accepted_length"] == 2.5


def test_mean_accepted_length_counts_cycles_not_requests():
    # 8 tokens after the first in 2 cycles of 4, and in 4 cycles of 2: 16 tokens in 6 cycles (not (4 + 2) / 2)
    records = [Record(0.0, 0.1, 1.0, 9, 5, 4.0), Record(0.0, 0.1, 1.0, 9, 9, 2.0)]
    assert summarize([(records, 1.0, None)])["mean_accepted_length"] == pytest.approx(16 / 6, abs=1e-4)


def test_summarize_rounds():
    """tokens/s: the median round's; the requests pool (4 of them, 8 tokens each)."""
    one = [Record(0.0, 0.1, 1.0, 8, 8, None)]
    cell = summarize([(one, 1.0, 0.5), (one, 4.0, 2.0), (one + one, 2.0, 1.0)])
    assert cell["tokens_per_s_rounds"] == [8.0, 2.0, 8.0] and cell["tokens_per_s"] == 8.0
    assert cell["num_requests"] == 4 and cell["num_output_tokens"] == 32 and cell["wall_s"] == 7.0
    assert cell["pass_efficiency"] == 0.5  # 3.5 s inside passes of 7.0 s
    assert summarize([(one, 1.0, 0.5), (one, 4.0, None)])["pass_efficiency"] is None  # unknown in one round


def _row(variant: str, c: int, tps: float, rounds: tuple[float, ...] = ()) -> dict:
    mode, _, block = variant.partition("/")
    return {
        "variant": variant,
        "mode": mode,
        "block_length": int(block) if block else None,
        "concurrency": c,
        "tokens_per_s": tps,
        "tokens_per_s_rounds": list(rounds or (tps,)),
    }


def test_speedups_and_advice():
    rows = [
        _row("ar", 1, 100),
        _row("self-spec/8", 1, 180),
        _row("diffusion/8", 1, 150),
        _row("ar", 8, 400),
        _row("self-spec/8", 8, 360),
        _row("diffusion/8", 8, 200),
    ]
    add_speedups(rows)
    assert [r["speedup_vs_ar"] for r in rows] == [1.0, 1.8, 1.5, 1.0, 0.9, 0.5]
    advice = advise(rows)
    assert [(a["concurrency"], a["variant"], a["speedup_vs_ar"]) for a in advice] == [
        (1, "self-spec/8", 1.8),
        (8, "ar", 1.0),
    ]
    assert advice[0]["runner_up"]["variant"] == "diffusion/8"
    assert "run self-spec at block length 8" in advice[0]["text"] and "1.80x AR" in advice[0]["text"]
    assert "run ar (400.0 tok/s)" in advice[1]["text"] and "next self-spec/8" in advice[1]["text"]


def test_advice_compares_auto_with_the_best_lossless_fixed_mode():
    """Diffusion emits other tokens: auto is measured against ar, self-spec and quadratic only."""
    rows = [
        _row("ar", 1, 100),
        _row("self-spec/8", 1, 180),
        _row("quadratic/8", 1, 200),
        _row("diffusion/8", 1, 400),
        _row("auto/8", 1, 190),
        _row("ar", 8, 400),
    ]
    add_speedups(rows)
    advice = advise(rows)
    assert (
        advice[0]["auto_vs_best_fixed"] == 0.95
        and "auto 0.95x the best of ar, self-spec, quadratic" in advice[0]["text"]
    )
    assert advice[1]["auto_vs_best_fixed"] is None and "auto" not in advice[1]["text"]


@pytest.mark.parametrize(
    "ar_rounds, spec_rounds, expected",
    [
        ((100,), (120,), None),  # one round each: no word on the noise
        ((90, 100, 110), (120, 130, 125), False),  # the best's slowest round beats the other's fastest
        ((90, 100, 121), (120, 130, 125), True),  # they overlap
    ],
)
def test_advice_says_when_too_close_to_call(ar_rounds, spec_rounds, expected):
    rows = [
        _row("ar", 1, sorted(ar_rounds)[len(ar_rounds) // 2], ar_rounds),
        _row("self-spec/8", 1, sorted(spec_rounds)[len(spec_rounds) // 2], spec_rounds),
    ]
    add_speedups(rows)
    advice = advise(rows)[0]
    assert advice["variant"] == "self-spec/8" and advice["too_close"] is expected
    assert ("too close to call" in advice["text"]) is bool(expected)


def test_no_ar_no_speedups():
    rows = [_row("self-spec/8", 1, 180), _row("diffusion/8", 1, 150)]
    add_speedups(rows)
    assert all(r["speedup_vs_ar"] is None for r in rows)
    assert advise(rows)[0]["variant"] == "self-spec/8" and "x AR" not in advise(rows)[0]["text"]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(modes=("ar", "beam")), "modes"),
        (dict(concurrency=(0,)), "concurrency"),
        (dict(concurrency=(1, 8), num_requests=4), "num_requests"),
        (dict(num_requests=16, duration_s=1.0), "duration_s"),
        (dict(duration_s=0.0), "duration_s"),
    ],
)
def test_settings_refused(kwargs, field):
    with pytest.raises(InputError, match=field):
        BenchSettings(**kwargs)


class _LoggingTarget:
    """A target that answers every request with max_tokens tokens at once and logs each request's
    mode and whether it was a warm-up (the longest prompt)."""

    kind, slots, default_block_length = "log", None, 8

    def __init__(self, longest: str):
        self.longest, self.log = longest, []

    def describe(self) -> dict:
        return {"kind": self.kind}

    def check(self, modes) -> None:
        pass

    def pass_seconds(self) -> None:
        return None

    def stream(self, ask):
        self.log.append((ask.mode.value, "warm-up" if ask.prompt == self.longest else "timed"))
        yield Update(ask.max_tokens, is_final=True)

    def close(self) -> None:
        pass


def test_each_timed_run_after_another_variant_s_starts_with_its_warm_up():
    """On CPU a mode's first passes after another's ran slower: each variant paid for the one before it."""
    prompts = ["a", "bb", "the longest"]
    target = _LoggingTarget(prompts[2])
    run_bench(
        target, prompts, BenchSettings(modes=("ar", "self-spec"), concurrency=(1, 2), num_requests=2, num_rounds=2)
    )
    ar, spec = (
        [("ar", "warm-up"), ("ar", "timed"), ("ar", "timed")],
        [("self-spec", "warm-up")] + [("self-spec", "timed")] * 2,
    )
    assert target.log == [("ar", "warm-up"), ("self-spec", "warm-up")] + (ar + spec) * 2 * 2  # levels x rounds
    alone = _LoggingTarget(prompts[2])
    run_bench(alone, prompts, BenchSettings(modes=("ar",), concurrency=(1,), num_requests=2, num_rounds=2))
    assert alone.log == [("ar", "warm-up")] + [("ar", "timed")] * 4  # nothing ran in between


def test_settings_requests_per_level():
    assert [BenchSettings().requests_at(c) for c in (1, 4, 8, 16)] == [8, 8, 16, 32]
    assert BenchSettings(num_requests=20).requests_at(16) == 20 and BenchSettings(duration_s=2).requests_at(1) is None


def test_read_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("a b\n\n  \nsecond\n")
    assert read_prompts(tmp_path / "p.txt") == ["a b", "second"]
    (tmp_path / "p.jsonl").write_text('"def f():\\n    "\n{"prompt": "x = 1"}\n')
    assert read_prompts(tmp_path / "p.jsonl") == ["def f():\n    ", "x = 1"]
    (tmp_path / "bad.jsonl").write_text('"ok"\n{"text": 3}\n')
    with pytest.raises(BenchError, match="line 2"):
        read_prompts(tmp_path / "bad.jsonl")


def test_default_prompts_are_evals_held_out_prompts():
    prompts = held_out_prompts(EMBEDDED_CHECKPOINT)
    assert len(prompts) == 16 and len(set(prompts)) == 16 and all(p.strip() for p in prompts)


# ---- in process on the tiny engine ---------------------------------------------------------------------------


def _bench(runner, *args) -> dict:
    result = runner.invoke(main, ["bench", *map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


@pytest.fixture(scope="module")
def in_process(tiny_engine_dir, prompts_file, tmp_path_factory):
    from click.testing import CliRunner

    out = tmp_path_factory.mktemp("bench") / "out"
    report = _bench(
        CliRunner(),
        "--engine",
        tiny_engine_dir,
        "--prompts",
        prompts_file,
        "--concurrency",
        "1,2",
        "--requests",
        4,
        "--max-tokens",
        MAX_TOKENS,
        "--threads",
        1,
        "--repeats",
        2,
        "--out",
        out,
    )
    return report, out


def check_report(report: dict, levels: list[int], num_requests: int, num_rounds: int = 1) -> None:
    rows = report["results"]
    variants = ["ar", "diffusion/4", "self-spec/4", "quadratic/4", "auto"]  # every mode; auto picks its block
    assert [(r["concurrency"], r["variant"]) for r in rows] == [(c, v) for c in levels for v in variants]
    for r in rows:
        assert r["num_requests"] == num_requests
        assert r["num_output_tokens"] == num_requests * MAX_TOKENS  # EOS ignored: every request makes max_tokens
        assert r["latency_s"]["p95"] >= r["latency_s"]["p50"] > 0
        assert r["ttft_s"]["p50"] <= r["latency_s"]["p50"] and r["ttft_s"]["p95"] <= r["latency_s"]["p95"]
        assert len(r["tokens_per_s_rounds"]) == num_rounds
        assert r["tokens_per_s"] == pytest.approx(sum(r["tokens_per_s_rounds"]) / num_rounds, abs=0.02)  # 1 or 2
        if num_rounds == 1:
            assert r["tokens_per_s"] == pytest.approx(r["num_output_tokens"] / r["wall_s"], rel=1e-3)
        ar = next(a for a in rows if a["mode"] == "ar" and a["concurrency"] == r["concurrency"])
        assert r["speedup_vs_ar"] == pytest.approx(r["tokens_per_s"] / ar["tokens_per_s"], abs=1e-3)
        if r["mode"] == "ar":
            assert r["speedup_vs_ar"] == 1.0 and r["tokens_per_pass"] == 1.0  # one-shot prefill, one token a pass
            assert r["mean_accepted_length"] is None
        if r["mode"] in ("self-spec", "quadratic"):
            assert 1.0 <= r["mean_accepted_length"] <= 5.0  # at most the block of 4 plus the bonus token
    assert [a["concurrency"] for a in report["advice"]] == levels
    for a in report["advice"]:
        best = max((r for r in rows if r["concurrency"] == a["concurrency"]), key=lambda r: r["tokens_per_s"])
        assert a["variant"] == best["variant"] in variants and f"concurrency {a['concurrency']}: run" in a["text"]


def test_in_process_report(in_process):
    report, _ = in_process
    check_report(report, [1, 2], 2 * 4, num_rounds=2)
    assert all(0 < r["pass_efficiency"] < 1 for r in report["results"])
    assert report["target"]["kind"] == "engine" and report["target"]["slots"] == 4
    assert report["settings"]["num_prompts"] == len(PROMPTS) and report["settings"]["temperature"] == 0.0
    assert report["machine"]["torch_threads"] == 1 and report["notes"] == []


def test_in_process_out_dir(in_process):
    report, out = in_process
    assert json.loads((out / "bench.json").read_text()) == report
    assert (out / "bench.png").read_bytes()[:8] == PNG and (out / "bench.png").stat().st_size > 10_000
    assert json.loads((out / "manifest.json").read_text())["stage"] == "bench"


def test_default_levels_stop_at_the_slots(runner, tiny_engine_dir, prompts_file):
    """Also: without --threads the engine runs on one torch thread, as `trimode serve` runs it."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        report = _bench(
            runner,
            "--engine",
            tiny_engine_dir,
            "--prompts",
            prompts_file,
            "--modes",
            "ar",
            "--max-tokens",
            2,
            "--warmup",
            0,
            "--requests",
            4,
        )
    finally:
        threads = torch.get_num_threads()
        torch.set_num_threads(before)
    assert threads == 1 and report["machine"]["torch_threads"] == 1
    assert [r["concurrency"] for r in report["results"]] == [1, 2, 4]
    assert report["notes"] == ["concurrency 8, 16 not measured: above the engine's 4 slots"]


def test_table_and_advice(runner, tiny_engine_dir, prompts_file):
    result = runner.invoke(
        main,
        [
            "bench",
            "--engine",
            str(tiny_engine_dir),
            "--prompts",
            str(prompts_file),
            "--modes",
            "ar,self-spec",
            "--concurrency",
            "2",
            "--max-tokens",
            "4",
            "--duration",
            "0.5",
        ],
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[1].split()[:4] == ["variant", "conc", "reqs", "tok/s"]
    assert lines[2].split()[:2] == ["ar", "2"] and lines[3].split()[:2] == ["self-spec/4", "2"]
    assert int(lines[2].split()[2]) >= 2  # a duration: each of the 2 clients sent at least one request
    assert lines[-2].startswith("advice") and lines[-1].strip().startswith("concurrency 2: run ")


# ---- against a real tritonserver -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_engine_dir, tmp_path_factory):
    repo = write_model_repo(tiny_engine_dir, tmp_path_factory.mktemp("bench-serve") / "repo")
    with TritonServer(repo, ports=Ports.free(), log_path=repo.parent / "tritonserver.log") as s:
        yield s


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_against_a_server(server, runner, prompts_file, protocol):
    port = server.ports.grpc if protocol == "grpc" else server.ports.http
    report = _bench(
        runner,
        "--url",
        f"127.0.0.1:{port}",
        "--protocol",
        protocol,
        "--prompts",
        prompts_file,
        "--concurrency",
        "1,8",
        "--requests",
        8,
        "--max-tokens",
        MAX_TOKENS,
        "--block-length",
        4,
        "--metrics-url",
        f"127.0.0.1:{server.ports.metrics}",
    )
    check_report(report, [1, 8], 8)
    assert report["target"] == {
        "kind": "triton",
        "url": f"127.0.0.1:{port}",
        "protocol": protocol,
        "prefix": "",
        "slots": 4,
        "metrics_url": f"127.0.0.1:{server.ports.metrics}",
    }
    assert all(0 < r["pass_efficiency"] < 1 for r in report["results"])  # the server's time inside passes
    assert report["settings"]["block_lengths"] == [4]  # named: a server does not say its default
    assert report["notes"] == [
        "concurrency 8 exceeds the engine's 4 slots: the extra requests wait in the server's queue"
    ]


# ---- bad input: one Error line, nothing written --------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_refuses_a_url_with_no_server(refused, prompts_file, tmp_path, protocol):
    port = Ports.free().grpc
    result = refused(
        [
            "bench",
            "--url",
            f"127.0.0.1:{port}",
            "--protocol",
            protocol,
            "--prompts",
            prompts_file,
            "--out",
            tmp_path / "out",
        ],
        tmp_path,
        "nothing listens there",
    )
    assert result.error.startswith(f"Error: --url 127.0.0.1:{port}: no Triton server answers there over {protocol} (")


@pytest.mark.parametrize(
    "protocol, hint",
    [("http", "is that the gRPC port? pass --protocol grpc"), ("grpc", "is that the HTTP port? pass --protocol http")],
)
def test_refuses_the_other_protocols_port(server, refused, prompts_file, tmp_path, protocol, hint):
    port = server.ports.grpc if protocol == "http" else server.ports.http
    result = refused(
        [
            "bench",
            "--url",
            f"127.0.0.1:{port}",
            "--protocol",
            protocol,
            "--prompts",
            prompts_file,
            "--out",
            tmp_path / "out",
        ],
        tmp_path,
        hint,
    )
    assert result.error.startswith(f"Error: --url 127.0.0.1:{port}: no Triton server answers there over {protocol} (")


@pytest.mark.parametrize(
    "args, message, code",
    [
        (["--modes", "ar,beam"], "expected distinct modes among ar, diffusion, self-spec", 2),
        (["--concurrency", "0"], "every value must be in [1, 65536]", 2),
        (["--concurrency", "1,two"], "expected integers separated by commas", 2),
        (["--concurrency", "1,8", "--requests", "4"], "--requests: 4 is fewer than concurrency 8", 1),
        (["--prompts", "missing.txt"], "--prompts missing.txt: cannot read it (No such file or directory)", 1),
        (["--prompts", "."], "--prompts .: cannot read it (Is a directory)", 1),
        (["--prompts", "empty.txt"], "--prompts empty.txt: holds no prompts", 1),
        (["--out", "taken"], "--out taken: exists and is not empty (--force replaces a previous bench output)", 1),
        (["--url", "127.0.0.1:1"], "pass one of --engine, --url and --openai (got --engine and --url)", 2),
        (["--threads", "0"], "--threads", 2),
        (["--prefix", "nld_"], "--prefix names a server's models: it needs --url or --openai", 2),
        (["--modes", "self-spec", "--save-step-times"], "--save-step-times needs ar among --modes", 2),
    ],
)
def test_bad_input_refused(refused, tiny_engine_dir, tmp_path, monkeypatch, args, message, code):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    refused(["bench", "--engine", tiny_engine_dir, *args], tmp_path, message, exit_code=code)


def test_save_step_times(runner, tiny_engine_dir, prompts_file, tmp_path):
    """The fixed modes' steps timed in the bench are stored with the engine; auto runs from them next."""
    from trimode.builder.engine_dir import load_engine

    d = tmp_path / "engine"
    shutil.copytree(tiny_engine_dir, d)
    args = ["--engine", d, "--prompts", prompts_file, "--concurrency", 1, "--requests", 4, "--max-tokens", 32]
    report = _bench(runner, *args, "--modes", "ar,self-spec,auto", "--save-step-times")
    assert report["target"]["auto_step_times"] == "build"  # what this run's auto started from
    assert f"step times of ar, self-spec/4 at batch sizes 1 saved to {d / 'step_times.json'}" in report["notes"][-1]
    saved = json.loads((d / "step_times.json").read_text())
    assert saved["measured"]["choices"] == ["ar", "self-spec/4"]
    assert saved["measured"]["date"] == report["date"] and saved["measured"]["machine"] == report["machine"]
    built = load_engine(d)
    assert built.step_times == saved["seconds"]
    assert set(saved["seconds"]) == set(built.manifest["auto"]["seconds"])  # the rest: the build's, scaled
    again = _bench(runner, *args, "--modes", "auto")
    assert again["target"]["auto_step_times"] == "saved" and again["results"][0]["num_output_tokens"] == 4 * 32


@pytest.mark.parametrize(
    "tokens, block, message",
    [
        (4, False, "too few AR steps to time (fewer than 16 at every batch size): nothing saved in"),
        (32, True, "step_times.json: cannot write it (Is a directory): step times not saved"),
    ],
)
def test_step_times_not_saved_after_the_bench_lose_no_report(
    runner, tiny_engine_dir, prompts_file, tmp_path, tokens, block, message
):
    """A save that fails after the bench says why after the report, which is printed, and exits 1."""
    d = tmp_path / "engine"
    shutil.copytree(tiny_engine_dir, d)
    if block:
        (d / "step_times.json").mkdir()  # in the way of the rename (an empty folder: no file of the build)
    args = ["--engine", d, "--prompts", prompts_file, "--concurrency", 1, "--requests", 1, "--max-tokens", tokens]
    result = runner.invoke(main, ["bench", *map(str, args), "--modes", "ar", "--save-step-times", "--json"])
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ") and message in result.stderr and len(result.stderr.splitlines()) == 1
    report = json.loads(result.stdout)
    assert report["results"][0]["num_output_tokens"] == tokens and message in report["notes"][-1]
    assert not (d / "step_times.json").is_file() and not list(d.glob(".step_times*"))


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "pass one of --engine, --url and --openai"),
        (["--url", "http://127.0.0.1:8001"], "expected HOST:PORT (no scheme)"),
        (["--url", "127.0.0.1:1", "--threads", "1"], "--threads sets this process's torch threads: it needs --engine"),
        (["--url", "127.0.0.1:1", "--save-step-times"], "--save-step-times stores the times with an engine dir"),
    ],
)
def test_bad_target_refused(refused, tmp_path, args, message):
    refused(["bench", *args], tmp_path, message, exit_code=2)


def test_an_output_inside_the_engine_or_being_the_prompts_is_refused(refused, tiny_engine_dir, prompts_file, tmp_path):
    """Written into the engine dir, bench.json made the engine fail its own file check on the next load."""
    engine = tiny_engine_dir
    refused(["bench", "--engine", engine, "--out", engine / "bench"], engine, "lies inside the input", exit_code=1)
    refused(
        ["bench", "--engine", engine, "--prompts", prompts_file, "--out", prompts_file],
        prompts_file.parent,
        "the output is the input",
        exit_code=1,
    )


def test_concurrency_above_the_engines_slots_refused(refused, tiny_engine_dir, prompts_file, tmp_path):
    refused(
        ["bench", "--engine", tiny_engine_dir, "--prompts", prompts_file, "--concurrency", "2,8"],
        tmp_path,
        "8: the engine runs 4 requests at once",
        exit_code=2,
    )


def test_refuses_a_missing_engine_dir(refused, tmp_path):
    refused(
        ["bench", "--engine", tmp_path / "nope", "--prompts", tmp_path / "nope.txt"], tmp_path, "--prompts"
    )  # the prompts are read first (cheap), so their error comes first
    (tmp_path / "p.txt").write_text("x\n")
    refused(
        ["bench", "--engine", tmp_path / "nope", "--prompts", tmp_path / "p.txt"],
        tmp_path,
        f"{tmp_path / 'nope'}: not a directory (build one with `trimode build`)",
    )
