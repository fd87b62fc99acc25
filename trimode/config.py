"""ModelSpec: the validated, frozen view of an NLD config.json (spec §1-§3)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from trimode.errors import ConfigError, InputError

MODEL_TYPE = "nemotron_labs_diffusion"
ARCHITECTURE = "NemotronLabsDiffusionModel"


@dataclass(frozen=True)
class RopeSpec:
    rope_type: str = "yarn"  # "yarn" or "default"
    rope_theta: float = 1e6
    factor: float = 16.0
    original_max_position_embeddings: int = 16384
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = 1.0
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    llama_4_scaling_beta: float = 0.1

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class ModelSpec:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    mask_token_id: int
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 262144
    block_size: int = 32
    torch_dtype: str = "bfloat16"
    rope: RopeSpec = RopeSpec()

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_file(cls, path: Path) -> "ModelSpec":
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json (is this an NLD checkpoint directory?)") from None
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ConfigError(f"{path}: not valid JSON ({type(e).__name__}: {e})") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelSpec":
        r = _Reader(raw, source)
        if raw.get("model_type") != MODEL_TYPE:
            raise ConfigError(
                f"{source}: key 'model_type': expected {MODEL_TYPE!r}, "
                f"got {raw.get('model_type')!r} (not a Nemotron-Labs Diffusion checkpoint)"
            )
        if raw.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: key 'hidden_act': only 'silu' is supported, got {raw['hidden_act']!r}")
        if raw.get("tie_word_embeddings", False):
            raise ConfigError(f"{source}: key 'tie_word_embeddings': NLD has untied embeddings, got true")
        heads = r.pos_int("num_attention_heads", most=MAX_HEADS)
        hidden = r.pos_int("hidden_size", most=MAX_WIDTH)
        kv_heads = r.pos_int("num_key_value_heads", heads, most=MAX_HEADS)
        if heads % kv_heads:
            raise ConfigError(
                f"{source}: key 'num_key_value_heads': {kv_heads} does not divide num_attention_heads={heads}"
            )
        vocab = r.pos_int("vocab_size", most=MAX_VOCAB)
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (eos,)
        if not eos_ids:
            raise r.fail("eos_token_id", "a token id or a non-empty list of them", eos)
        for e in eos_ids:
            r.token_id("eos_token_id", e, vocab)
        spec = cls(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=r.pos_int("intermediate_size", most=MAX_WIDTH * 8),
            num_hidden_layers=r.pos_int("num_hidden_layers", most=MAX_LAYERS),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=r.head_dim(hidden // heads),
            mask_token_id=r.token_id("mask_token_id", raw.get("mask_token_id"), vocab),
            eos_token_ids=eos_ids,
            bos_token_id=r.optional_token_id("bos_token_id", vocab),
            pad_token_id=r.optional_token_id("pad_token_id", vocab),
            rms_norm_eps=r.pos_float("rms_norm_eps", 1e-5, most=0.5),
            max_position_embeddings=r.pos_int("max_position_embeddings", 262144, most=MAX_POSITIONS),
            block_size=r.pos_int("block_size", 32, most=MAX_BLOCK),
            torch_dtype=r.dtype(),
            rope=_read_rope(raw, r, source),
        )
        return spec

    def to_dict(self) -> dict[str, Any]:
        """The config.json this spec reads back from (NLD keys and spelling)."""
        out: dict[str, Any] = {
            "architectures": [ARCHITECTURE],
            "model_type": MODEL_TYPE,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "dlm_paradigm": "bidirectional",
        }
        for f in dataclasses.fields(self):
            if f.name not in ("rope", "eos_token_ids"):
                out[f.name] = getattr(self, f.name)
        out["eos_token_id"] = self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids)
        out["rope_parameters"] = self.rope.to_dict()
        return out


_Default = TypeVar("_Default", float, None)  # rope_config's num(): a float default gives a float
_DTYPES = ("bfloat16", "float16", "float32")
# Sane ranges: far beyond any real checkpoint, small enough that nothing downstream overflows.
MAX_VOCAB, MAX_WIDTH, MAX_LAYERS, MAX_HEADS, MAX_HEAD_DIM = 1 << 24, 1 << 17, 1024, 1024, 1024
MAX_POSITIONS, MAX_BLOCK = (1 << 31) - 1, 1 << 16


class _Reader:
    """Typed access to config keys; every error names the file, the key and the bad value."""

    def __init__(self, raw: dict[str, Any], source: str):
        self.raw, self.source = raw, source

    def fail(self, key: str, expected: str, value: Any) -> ConfigError:
        return ConfigError(f"{self.source}: key {key!r}: expected {expected}, got {value!r}")

    def get(self, key: str, default: Any):
        if key not in self.raw or self.raw[key] is None:
            if default is None:
                raise ConfigError(f"{self.source}: missing required key {key!r}")
            return default
        return self.raw[key]

    def pos_int(
        self,
        key: str,
        default: int | None = None,
        most: int = MAX_POSITIONS,
        raw: dict | None = None,
        label: str | None = None,
    ) -> int:
        v = self.get(key, default) if raw is None else raw.get(key, default)
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= most:
            raise self.fail(label or key, f"an integer in [1, {most}]", v)
        return v

    def head_dim(self, default: int) -> int:
        v = self.get("head_dim", default)
        if not isinstance(v, int) or isinstance(v, bool) or not 2 <= v <= MAX_HEAD_DIM or v % 2:
            raise self.fail("head_dim", f"an even integer in [2, {MAX_HEAD_DIM}] (rotary pairs)", v)
        return v

    def pos_float(
        self,
        key: str,
        default: float | None = None,
        raw: dict | None = None,
        label: str | None = None,
        least: float = 0.0,
        most: float = 1e6,
        least_is_open: bool = True,
    ) -> float:
        v = (raw if raw is not None else self.raw).get(key, default)
        if v is None and default is None:
            raise ConfigError(f"{self.source}: missing required key {label or key!r}")
        if not (
            isinstance(v, (int, float))
            and not isinstance(v, bool)
            and math.isfinite(v)
            and (v > least if least_is_open else v >= least)
            and v <= most
        ):
            bracket = "(" if least_is_open else "["
            raise self.fail(label or key, f"a finite number in {bracket}{least:g}, {most:g}]", v)
        return float(v)

    def token_id(self, key: str, v: Any, vocab: int) -> int:
        if v is None:
            raise ConfigError(f"{self.source}: missing required key {key!r}")
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < vocab:
            raise self.fail(key, f"a token id in [0, {vocab})", v)
        return v

    def optional_token_id(self, key: str, vocab: int) -> int | None:
        v = self.raw.get(key)
        return None if v is None else self.token_id(key, v, vocab)

    def dtype(self) -> str:
        v = self.raw.get("torch_dtype", self.raw.get("dtype", "bfloat16"))
        if v not in _DTYPES:
            raise self.fail("torch_dtype", f"one of {', '.join(_DTYPES)}", v)
        return v


def _read_rope(raw: dict[str, Any], r: _Reader, source: str) -> RopeSpec:
    rp: Any = raw.get("rope_parameters", raw.get("rope_scaling"))  # JSON, checked below
    if rp is None:
        rp = {"rope_type": "default", "rope_theta": raw.get("rope_theta", 1e6)}
    if not isinstance(rp, dict):
        raise r.fail("rope_parameters", "an object", rp)
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    if rope_type not in ("yarn", "default"):
        raise r.fail("rope_parameters.rope_type", "'yarn' or 'default'", rope_type)
    if "rope_theta" not in rp and raw.get("rope_theta") is not None:
        rp = {**rp, "rope_theta": raw["rope_theta"]}
    d = RopeSpec()

    def num(
        key: str, default: _Default, least: float = 0.0, most: float = 1e6, least_is_open: bool = True
    ) -> float | _Default:
        if rp.get(key) is None:
            return default  # absent or null: the default
        return r.pos_float(
            key, default, raw=rp, label=f"rope_parameters.{key}", least=least, most=most, least_is_open=least_is_open
        )

    truncate = rp.get("truncate", True)
    if not isinstance(truncate, bool):
        raise r.fail("rope_parameters.truncate", "true or false", truncate)
    return RopeSpec(
        rope_type=rope_type,
        # theta > 1: the wavelengths grow with the dimension (and YaRN divides by log(theta))
        rope_theta=r.pos_float("rope_theta", None, raw=rp, label="rope_parameters.rope_theta", least=1.0, most=1e15),
        factor=num("factor", d.factor, least=1.0, most=1e6, least_is_open=False) if rope_type == "yarn" else 1.0,
        original_max_position_embeddings=r.pos_int(
            "original_max_position_embeddings",
            d.original_max_position_embeddings,
            raw=rp,
            label="rope_parameters.original_max_position_embeddings",
        ),
        beta_fast=num("beta_fast", d.beta_fast, least=1e-3, most=1e3, least_is_open=False),
        beta_slow=num("beta_slow", d.beta_slow, least=1e-3, most=1e3, least_is_open=False),
        mscale=num("mscale", None, most=100.0),
        mscale_all_dim=num("mscale_all_dim", None, most=100.0),
        attention_factor=num("attention_factor", None, most=100.0),
        truncate=truncate,
        llama_4_scaling_beta=num("llama_4_scaling_beta", 0.0, most=100.0, least_is_open=False),
    )


def check_device(device: str) -> None:
    """cpu, cuda or cuda:N with that GPU present, else InputError (the CLI's --device, LLM's device)."""
    m = re.fullmatch(r"(cpu|cuda)(?::(\d{1,4}))?", str(device))
    if m is None or (m.group(1) == "cpu" and m.group(2)):
        raise InputError(f"{device!r} is not a device: expected cpu, cuda or cuda:N")
    if m.group(1) == "cuda":
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if int(m.group(2) or 0) >= count:
            raise InputError(f"{device!r}: {count or 'no'} CUDA device{'s' * (count != 1)} available")
