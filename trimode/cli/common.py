"""What the command modules share: option types, the default checkpoint, JSON output, engine loading
and the calibration progress bar."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from trimode import EMBEDDED_CHECKPOINT
from trimode.errors import InputError
from trimode.passes import Mode

if TYPE_CHECKING:  # the builder imports torch: only where an engine is loaded
    from trimode.builder.engine_dir import BuiltEngine

MODES = tuple(m.value for m in Mode)
MAX_SEED = 2**63 - 1
SEED = click.IntRange(0, MAX_SEED)


class FiniteFloat(click.FloatRange):
    """A FloatRange that also refuses nan and inf (which compare False to every bound)."""

    def convert(self, value, param, ctx):
        v = super().convert(value, param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return v


class ThresholdType(click.ParamType):
    name = "FLOAT in [0, 1]|none"

    def convert(self, value, param, ctx):
        if value is None or value == "none":
            return value
        if str(value).lower() == "none":
            return "none"
        try:
            v = float(value)
        except ValueError:
            self.fail(f"{value!r} is neither a number nor 'none'", param, ctx)
        if not 0 <= v <= 1:  # also refuses nan
            self.fail(f"{value!r} is not in the range 0<=x<=1", param, ctx)
        return v


class IntList(click.ParamType):
    """Comma-separated integers in [1, 65536], e.g. 4,8,16."""

    name = "N[,N...]"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            values = tuple(int(x) for x in str(value).split(","))
        except ValueError:
            self.fail(f"{value!r}: expected integers separated by commas", param, ctx)
        if not all(1 <= v <= 65536 for v in values):
            self.fail(f"{value!r}: every value must be in [1, 65536]", param, ctx)
        return values


class DeviceType(click.ParamType):
    name = "cpu|cuda|cuda:N"

    def convert(self, value, param, ctx):
        from trimode.config import check_device

        try:
            check_device(value)
        except InputError as e:
            self.fail(str(e), param, ctx)
        return str(value)


class ModeList(click.ParamType):
    """Comma-separated modes, e.g. ar,self-spec."""

    name = "MODE[,MODE...]"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        modes = tuple(m.strip() for m in str(value).split(","))
        bad = [m for m in modes if m not in MODES]
        if bad or len(set(modes)) != len(modes):
            self.fail(f"{value!r}: expected distinct modes among {', '.join(MODES)}", param, ctx)
        return modes


def echo_json(obj: object) -> None:
    """Strict JSON on stdout: a non-finite number (a NaN perplexity, say) is written as null."""

    def finite(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: finite(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [finite(v) for v in x]
        return x

    click.echo(json.dumps(finite(obj), indent=2, allow_nan=False))


def resolve_device(name: str | None) -> str:
    """--device as given, else cuda where there is one."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def refuse_with_engine(**fixed) -> None:
    """--engine with an option the engine dir fixes at build time (fixed: name -> value given): one line."""
    given = [name for name, value in fixed.items() if value is not None]
    if given:
        raise InputError(
            f"--engine and --{given[0].replace('_', '-')}: the engine dir fixes its "
            f"{given[0].replace('_', ' ')} at build time; pass one of them"
        )


def load_engine(engine_dir: Path, checkpoint_dir: Path | None, device: str | None) -> BuiltEngine:
    """A built engine dir, refused with --checkpoint (the engine dir holds its own)."""
    from trimode.builder.engine_dir import load_engine as load_engine_dir

    refuse_with_engine(checkpoint=checkpoint_dir)
    return load_engine_dir(engine_dir, device)


def resolve_checkpoint_dir(path: Path | None) -> Path:
    """--checkpoint as given, else the embedded checkpoint of this build."""
    if path is not None:
        return path
    if (EMBEDDED_CHECKPOINT / "config.json").is_file():
        return EMBEDDED_CHECKPOINT
    raise InputError(
        "no embedded default checkpoint in this build: pass --checkpoint DIR "
        "(make one with: trimode make-checkpoint --random --out DIR)"
    )


class CalibrationBar:
    """A progress bar over the calibration windows (quantize_checkpoint's progress), opened at the
    first calibrated batch, so that input errors print alone."""

    def __init__(self, total: int, quiet: bool):
        self.total, self.quiet = total, quiet
        self.bar: Any = None  # a tqdm bar once the first batch is calibrated

    def update(self, num_windows: int) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc="calibrate", unit="window", disable=self.quiet, file=sys.stderr)
        self.bar.update(num_windows)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
