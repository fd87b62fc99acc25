"""decoding/step_times.py and engine_dir's step_times.json: the step times `trimode bench
--save-step-times` measures and stores with an engine, which auto starts from where it is loaded next."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest

from trimode.cli import main
from trimode.decoding import step_times
from trimode.decoding.auto import RUN_CYCLES
from trimode.decoding.settings import DecodeConfig
from trimode.decoding.step_times import MIN_STEPS, StepTimes, merge
from trimode.errors import EngineError
from trimode.passes import Mode


class FakeBatch:
    def __init__(self, size: int, block_length: int = 4):
        self.seqs = [SimpleNamespace(block_length=block_length, pending=None) for _ in range(size)]

    def __len__(self) -> int:
        return len(self.seqs)


class Clock:
    """perf_counter of step_times: each policy step takes the seconds it is told."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class Policy:
    def __init__(self, clock: Clock, seconds: float):
        self.clock, self.seconds = clock, seconds

    def step(self, batch, config):
        self.clock.now += self.seconds
        return [[7] for _ in batch.seqs]


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(step_times, "time", clock)
    return clock


def test_median_per_choice_and_batch_size_from_the_run_cycles_th_step(clock):
    times = StepTimes()
    ar, spec = Policy(clock, 2**-10), Policy(clock, 2**-8)  # exact in binary: sums of them too
    for _ in range(RUN_CYCLES - 1):  # a run's first steps: not timed
        assert times.run(Policy(clock, 1.0), FakeBatch(1), DecodeConfig(Mode.AR)) == [[7]]
    assert times.table() == {}
    for _ in range(MIN_STEPS - 1):
        times.run(ar, FakeBatch(1), DecodeConfig(Mode.AR))
    assert times.table() == {}  # fewer than MIN_STEPS
    times.run(ar, FakeBatch(1), DecodeConfig(Mode.AR))
    assert times.table() == {"ar": {"1": 2**-10}}
    for _ in range(RUN_CYCLES - 1 + MIN_STEPS):
        times.run(spec, FakeBatch(2, block_length=8), DecodeConfig(Mode.SELF_SPEC, 8))
    assert times.table() == {"ar": {"1": 2**-10}, "self-spec/8": {"2": 2**-8}}
    slow = Policy(clock, 2**-6)  # one slow step in many does not move the median
    times.run(slow, FakeBatch(2, block_length=8), DecodeConfig(Mode.SELF_SPEC, 8))
    assert times.table()["self-spec/8"] == {"2": 2**-8}


def test_a_mode_change_starts_a_new_run_and_only_auto_s_choices_are_timed(clock):
    times = StepTimes()
    for i in range(3 * RUN_CYCLES * MIN_STEPS):  # alternating: never RUN_CYCLES in a row
        mode = (Mode.AR, Mode.QUADRATIC)[i % 2]
        times.run(Policy(clock, 0.001), FakeBatch(1), DecodeConfig(mode, None if mode is Mode.AR else 4))
    for _ in range(RUN_CYCLES * MIN_STEPS):  # diffusion is not a choice of auto
        times.run(Policy(clock, 0.001), FakeBatch(1), DecodeConfig(Mode.DIFFUSION, 4))
    assert times.table() == {}


def test_merge_keeps_the_new_times_and_scales_the_old_ones_by_ar_s():
    old = {
        "ar": {"1": 1.0, "2": 1.2, "4": 1.6, "8": 2.0},
        "self-spec/4": {"1": 3.0, "8": 8.0},
        "quadratic/4": {"1": 4.0, "4": 6.4},
    }
    new = {"ar": {"1": 0.5, "2": 0.9}, "self-spec/4": {"1": 1.0}}
    merged = merge(new, old)
    assert merged["ar"]["1"] == 0.5 and merged["ar"]["2"] == 0.9 and merged["self-spec/4"]["1"] == 1.0
    # old's at a size new did not time: scaled as AR at the nearest size both timed (2: 0.9 / 1.2)
    assert merged["ar"]["4"] == pytest.approx(1.6 * 0.75) and merged["ar"]["8"] == pytest.approx(2.0 * 0.75)
    assert merged["self-spec/4"]["8"] == pytest.approx(8.0 * 0.75)
    assert merged["quadratic/4"] == pytest.approx({"1": 4.0 * 0.5, "4": 6.4 * 0.75})
    assert new == {"ar": {"1": 0.5, "2": 0.9}, "self-spec/4": {"1": 1.0}}  # not changed


def test_an_engine_times_its_fixed_modes_without_changing_a_token(tiny):
    """Engine.step_times on: AR and self-spec timed per batch size, auto and diffusion not; the
    same tokens as without it."""
    from trimode.decoding import Engine, EngineConfig, SamplingParams

    def run(timer: StepTimes | None) -> list[list[int]]:
        engine = Engine(tiny.model, EngineConfig(2, 96, 16))
        engine.step_times = timer
        seqs = []
        for mode in (Mode.AR, Mode.SELF_SPEC, Mode.DIFFUSION, Mode.AUTO):
            prompt = tiny.tokenizer.encode("def f(x):")
            seqs.append(engine.add(prompt, SamplingParams(48, ignore_eos=True), DecodeConfig(mode, 4)))
            while engine.has_work:
                engine.step()
        return [s.tokens for s in seqs]

    timer = StepTimes()
    assert run(timer) == run(None)
    assert set(timer.table()) == {"ar", "self-spec/4"} and set(timer.table()["ar"]) == {"1"}


@pytest.fixture
def engine_copy(tiny_engine_dir, tmp_path):
    d = tmp_path / "engine"
    shutil.copytree(tiny_engine_dir, d)
    return d


def test_saved_times_are_what_auto_starts_from_where_the_engine_loads_next(engine_copy, runner):
    from trimode.builder.engine_dir import load_engine, save_step_times

    built = load_engine(engine_copy)
    build = built.manifest["auto"]["seconds"]
    assert built.step_times == build  # nothing saved yet: the build's
    path = save_step_times(built, {"ar": {"1": 0.5}, "self-spec/4": {"1": 1.0}}, {"date": "today"})
    saved = json.loads(path.read_text())
    assert saved["engine_digest"] == built.manifest["digest_sha256"]
    assert saved["measured"] == {"date": "today", "choices": ["ar", "self-spec/4"]}
    scale = 0.5 / build["ar"]["1"]
    assert saved["seconds"]["self-spec/4"]["1"] == 1.0
    assert saved["seconds"]["quadratic/4"]["1"] == pytest.approx(build["quadratic/4"]["1"] * scale)
    again = load_engine(engine_copy)  # the saved file is not an edit of the build
    assert again.step_times == saved["seconds"]
    auto = again.new_engine().auto
    assert auto.prior[Mode.SELF_SPEC, 1, 4] == 1.0 and auto.prior[Mode.AR, 1, 0] == 0.5
    shown = runner.invoke(main, ["inspect", str(engine_copy)]).stdout
    assert "auto       ms per step measured by trimode bench (today, ?, threads ?;" in shown
    assert "self-spec/4 b1 1000.00" in shown and "ar b1 500.00" in shown  # ms
    as_json = json.loads(runner.invoke(main, ["inspect", str(engine_copy), "--json"]).stdout)
    assert as_json["step_times"] == saved and as_json["auto"] == built.manifest["auto"]
    # a second save keeps what the first measured and this one did not, scaled by the new AR's
    save_step_times(again, {"ar": {"1": 0.25}, "quadratic/4": {"1": 0.75}}, {})
    seconds = load_engine(engine_copy).step_times
    assert seconds["quadratic/4"]["1"] == 0.75 and seconds["self-spec/4"]["1"] == pytest.approx(0.5)


def test_too_few_ar_steps_save_nothing(engine_copy):
    from trimode.builder.engine_dir import load_engine, save_step_times

    before = sorted(p.name for p in engine_copy.iterdir())
    with pytest.raises(EngineError, match="too few AR steps to time"):
        save_step_times(load_engine(engine_copy), {"self-spec/4": {"1": 1.0}}, {})
    assert sorted(p.name for p in engine_copy.iterdir()) == before


def _saved(d, **fields) -> None:
    m = json.loads((d / "manifest.json").read_text())
    saved = {"engine_digest": m["digest_sha256"], "seconds": {"ar": {"1": 2**-10}}, **fields}
    (d / "step_times.json").write_text(json.dumps(saved))


@pytest.mark.parametrize(
    "write, message",
    [
        (lambda d: (d / "step_times.json").write_text("{not json"), "unreadable (JSONDecodeError)"),
        (lambda d: (d / "step_times.json").write_bytes(b"\xff\xfe"), "unreadable (UnicodeDecodeError)"),
        (lambda d: _saved(d, engine_digest="0" * 64), "not measured on this build of the engine"),
        (lambda d: (d / "step_times.json").write_text("[]"), "not measured on this build of the engine"),
        (lambda d: _saved(d, seconds={"self-spec/4": {"1": 0.1}}), "AR's among them"),
        (lambda d: _saved(d, seconds={"ar": {"1": 0.1}, "self-spec/3": {"1": 0.1}}), "seconds: expected"),
        (lambda d: _saved(d, seconds={"ar": {"1": -1}}), "seconds: expected"),
        (lambda d: _saved(d, seconds={"ar": {"1": float("inf")}}), "seconds: expected"),
        (lambda d: _saved(d, seconds={"ar": {"1": 0.1, "99": 0.1}}), "a batch size above the engine's"),
    ],
)
@pytest.mark.parametrize(
    "command",
    [
        ["generate", "--engine", "{d}", "hi", "--max-new-tokens", "2"],
        ["inspect", "{d}"],
        ["repo", "{d}", "--out", "{d}.repo"],
    ],
)
def test_a_bad_step_times_file_is_refused_in_one_line(engine_copy, refused, write, message, command):
    """Before the self-test, by every command that loads the engine, by inspect, and by repo (so a
    server does not fail to load it), saying what to do: delete it first, as the bench that would
    measure again loads the engine too."""
    write(engine_copy)
    result = refused([a.format(d=engine_copy) for a in command], engine_copy, message)
    assert f"trimode bench --engine {engine_copy} --save-step-times" in result.error
    assert "delete the file (auto then starts from the build's times), then measure them again" in result.error


def test_a_save_cut_short_leaves_an_engine_that_loads(engine_copy):
    from trimode.builder.engine_dir import load_engine

    (engine_copy / ".step_times.json.4242.part").write_text('{"engine_dig')  # killed while writing
    assert load_engine(engine_copy).step_times == load_engine(engine_copy).manifest["auto"]["seconds"]
