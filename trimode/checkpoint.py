"""Read an NLD checkpoint directory (spec §2): config, safetensors (single or sharded),
the optional `linear_spec_lora/` draft adapter, and the tokenizer."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from trimode.config import ModelSpec
from trimode.errors import CheckpointError
from trimode.fp8 import FP8Linear
from trimode.model import DRAFT_LINEARS, NLDModel
from trimode.rope import rope_frequencies
from trimode.safetensors_mmap import MappedFiles, TensorInfo, read_header
from trimode.tokenizer import Tokenizer

WEIGHT_DTYPES = ("BF16", "F16", "F32")
ADAPTER_DIR = "linear_spec_lora"
_LORA_NAME = re.compile(r"layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")
# A draft adapter's LoRA factors: (layer index, linear name in DRAFT_LINEARS) -> (A [r, in], B [out, r]).
Factors = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Checkpoint:
    checkpoint_dir: Path
    spec: ModelSpec
    model: NLDModel
    tokenizer: Tokenizer


def default_dtype(device: torch.device, is_fp8: bool = False) -> torch.dtype:
    """CPU runs fp32 (bf16 GEMMs are slow there and the reference should be precise); GPUs run bf16.
    FP8 on CPU runs fp64 around the simulated FP8 GEMMs: rounding activations to E4M3 turns the
    1e-7 differences between a one-token AR pass and an L-token verify pass into whole-code flips,
    and 1 in 16 self-spec sequences then left the AR tokens in fp32 (none in fp64, measured on the
    embedded checkpoint). fp64 keeps the invariant that self-spec at temperature 0 is AR greedy."""
    if device.type != "cpu":
        return torch.bfloat16
    return torch.float64 if is_fp8 else torch.float32


def load_checkpoint(
    checkpoint_dir: Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    draft_adapter: bool = True,
) -> Checkpoint:
    """draft_adapter=False leaves a `linear_spec_lora/` unmerged: the base model's drafts (eval
    with and without the adapter, and the adapter's own training, which needs the bare o_proj)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise CheckpointError(f"{checkpoint_dir}: not a directory")
    spec = ModelSpec.from_file(checkpoint_dir / "config.json")
    tokenizer = Tokenizer(checkpoint_dir, spec)
    device = torch.device(device)
    quant = read_quant_config(checkpoint_dir)
    model = load_model(
        checkpoint_dir, spec, device, dtype or default_dtype(device, quant is not None), quant, draft_adapter
    )
    return Checkpoint(checkpoint_dir, spec, model, tokenizer)


def load_model(
    checkpoint_dir: Path,
    spec: ModelSpec,
    device: torch.device,
    dtype: torch.dtype,
    quant: dict | None,
    draft_adapter: bool = True,
) -> NLDModel:
    """The model on `device`; quant is the checkpoint's hf_quant_config (None: not quantized)."""
    with torch.device("meta"):
        model = NLDModel(spec)
    infos = _weight_index(checkpoint_dir)
    files = MappedFiles()
    if quant:
        _load_fp8_modules(model, infos, files, device)
        attn = model.encoder.layers[0].self_attn
        if not isinstance(attn.q_proj, FP8Linear):
            raise CheckpointError(f"{checkpoint_dir}: hf_quant_config.json says FP8 but the weights are not float8")
        if quant.get("kv_cache_quant_algo") == "FP8" and attn.k_scale is None:
            raise CheckpointError(
                f"{checkpoint_dir}: hf_quant_config.json says FP8 KV cache but there are no k_scale/v_scale"
            )
    state = {}
    for name, param in model.state_dict().items():
        if not param.is_meta:
            continue  # FP8 modules, loaded above
        info = infos.get(name)
        if info is None:
            raise CheckpointError(f"{checkpoint_dir}: weight {name!r} is missing from the safetensors files")
        _check(info, name, tuple(param.shape))
        state[name] = files.tensor(info).to(device=device, dtype=dtype)
    model.load_state_dict(state, assign=True, strict=False)
    model.inv_freq = rope_frequencies(spec.rope, spec.head_dim)[0].to(device)  # was built on meta
    if draft_adapter and (checkpoint_dir / ADAPTER_DIR).is_dir() and not model.has_draft_adapter:
        if quant:
            raise CheckpointError(
                f"{checkpoint_dir}: an FP8 checkpoint carries its draft adapter merged "
                f"(the *_draft linears); a separate {ADAPTER_DIR}/ cannot be applied to FP8 weights"
            )
        attach_draft_adapter(model, checkpoint_dir / ADAPTER_DIR)
    return model.eval().requires_grad_(False)


def read_quant_config(checkpoint_dir: Path) -> dict | None:
    """hf_quant_config.json of a ModelOpt FP8 export, or None for an unquantized checkpoint."""
    path = checkpoint_dir / "hf_quant_config.json"
    if not path.is_file():
        return None
    try:
        quant = json.loads(path.read_text())["quantization"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise CheckpointError(f"{path}: not a ModelOpt quantization config ({type(e).__name__}: {e})") from None
    if not isinstance(quant, dict):
        raise CheckpointError(f"{path}: key 'quantization': expected an object, got {quant!r}")
    if quant.get("kv_cache_quant_algo") not in ("FP8", None):
        raise CheckpointError(
            f"{path}: key 'kv_cache_quant_algo': expected 'FP8' or null, got {quant.get('kv_cache_quant_algo')!r}"
        )
    if quant.get("quant_algo") != "FP8":
        raise CheckpointError(f"{path}: key 'quant_algo': only 'FP8' is supported, got {quant.get('quant_algo')!r}")
    return quant


def _load_fp8_modules(model: NLDModel, infos: dict[str, TensorInfo], files: MappedFiles, device: torch.device) -> None:
    """Swap every Linear stored as float8_e4m3fn for an FP8Linear; read K/V scales; the merged draft twins."""

    def tensor(name: str, shape: tuple[int, ...], dtypes: tuple[str, ...]) -> torch.Tensor:
        info = infos.get(name)
        if info is None:
            raise CheckpointError(f"FP8 checkpoint: tensor {name!r} is missing")
        _check(info, name, shape, dtypes)
        return files.tensor(info).to(device)

    def fp8_linear(prefix: str, out_features: int, in_features: int) -> FP8Linear:
        return FP8Linear(
            tensor(f"{prefix}.weight", (out_features, in_features), ("F8_E4M3",)),
            tensor(f"{prefix}.weight_scale", (), ("F32",)),
            tensor(f"{prefix}.input_scale", (), ("F32",)),
        )

    for name, module in list(model.named_modules()):
        info = infos.get(f"{name}.weight")
        if isinstance(module, nn.Linear) and info is not None and info.dtype == "F8_E4M3":
            parent, attr = model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
            setattr(parent, attr, fp8_linear(name, module.out_features, module.in_features))
    for i, layer in enumerate(model.encoder.layers):
        attn, prefix = layer.self_attn, f"encoder.layers.{i}.self_attn"
        if f"{prefix}.k_proj.k_scale" in infos:
            attn.k_scale = tensor(f"{prefix}.k_proj.k_scale", (), ("F32",))
            attn.v_scale = tensor(f"{prefix}.v_proj.v_scale", (), ("F32",))
        for name, owner_name in DRAFT_LINEARS.items():
            owner, twin = getattr(layer, owner_name), f"encoder.layers.{i}.{owner_name}.{name}_draft"
            if f"{twin}.weight" in infos:
                base = getattr(owner, name)
                setattr(owner, f"{name}_draft", fp8_linear(twin, base.out_features, base.in_features))


def _weight_index(checkpoint_dir: Path) -> dict[str, TensorInfo]:
    single, index = checkpoint_dir / "model.safetensors", checkpoint_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _weight_map(index)
        shards = sorted(set(weight_map.values()))
    elif single.is_file():
        weight_map, shards = {}, [single.name]
    else:
        raise CheckpointError(f"{checkpoint_dir}: no model.safetensors or model.safetensors.index.json")
    infos: dict[str, TensorInfo] = {}
    for shard in shards:
        for name, info in read_header(checkpoint_dir / shard).items():
            if name in infos:
                raise CheckpointError(f"{info.path}: tensor {name!r} is also in {infos[name].path.name}")
            infos[name] = info
    for name, shard in weight_map.items():  # an index that lies about its shards is a corrupt checkpoint
        if name not in infos or infos[name].path.name != shard:
            raise CheckpointError(f"{index}: tensor {name!r} is not in {shard}, the shard the index names for it")
    return infos


def _weight_map(index: Path) -> dict[str, str]:
    """An index's tensor name -> shard file, every shard a plain .safetensors file name inside the
    checkpoint folder."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise CheckpointError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: 'weight_map' must be a non-empty object of tensor name -> shard file")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or Path(shard).name != shard or not shard.endswith(".safetensors"):
            raise CheckpointError(
                f"{index}: tensor {name!r}: shard {shard!r} is not a .safetensors file name in the checkpoint folder"
            )
        path = index.parent / shard
        if not path.is_file():
            raise CheckpointError(f"{index}: tensor {name!r}: shard {shard!r} is missing")
    return weight_map


def _check(info: TensorInfo, name: str, shape: tuple[int, ...], dtypes: tuple[str, ...] = WEIGHT_DTYPES) -> None:
    if info.shape != shape:
        raise CheckpointError(
            f"{info.path}: tensor {name!r} has shape {list(info.shape)}, config.json implies {list(shape)}"
        )
    if info.dtype not in dtypes:
        raise CheckpointError(
            f"{info.path}: tensor {name!r} has dtype {info.dtype}; expected one of {', '.join(dtypes)}"
        )


def read_draft_adapter(adapter_dir: Path, model: NLDModel) -> tuple[Factors, float]:
    """The PEFT LoRA of the draft pass: -> (its factors in fp32, every layer's for each target module;
    the scale alpha/r)."""
    config_path = adapter_dir / "adapter_config.json"
    r, scale, targets = _lora_config(config_path)
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise CheckpointError(f"{adapter_dir}: no adapter_model.safetensors")
    infos = read_header(adapter_dir / "adapter_model.safetensors")
    files = MappedFiles()
    found: dict[tuple[int, str, str], tuple[str, TensorInfo]] = {}
    for name, info in infos.items():
        m = _LORA_NAME.search(name)
        if m and DRAFT_LINEARS.get(m.group(3)) == m.group(2):
            found[(int(m.group(1)), m.group(3), m.group(4))] = name, info
    factors: Factors = {}
    for i, layer in enumerate(model.encoder.layers):
        for name in targets:
            w = getattr(getattr(layer, DRAFT_LINEARS[name]), name).weight
            a, b = found.get((i, name, "A")), found.get((i, name, "B"))
            if a is None or b is None:
                raise CheckpointError(
                    f"{adapter_dir / 'adapter_model.safetensors'}: no LoRA A/B for layer {i} "
                    f"{name}, which adapter_config.json's 'target_modules' names"
                )
            _check(a[1], f"layer {i} {name} lora_A", (r, w.shape[1]))
            _check(b[1], f"layer {i} {name} lora_B", (w.shape[0], r))
            factors[i, name] = (_finite(files, *a).to(w.device), _finite(files, *b).to(w.device))
    return factors, scale


def _finite(files: MappedFiles, name: str, info: TensorInfo) -> torch.Tensor:
    """A LoRA factor in fp32. NaN or inf would otherwise show up only as non-finite logits in the draft
    pass (the scan costs less than the merge that follows)."""
    t = files.tensor(info).float()
    if not torch.isfinite(t).all():
        raise CheckpointError(f"{info.path}: tensor {name!r} has non-finite values (NaN or inf)")
    return t


def attach_draft_adapter(model: NLDModel, adapter_dir: Path) -> None:
    """Merge the PEFT LoRA into a draft twin of each linear it adapts: W_draft = W + scale * B @ A."""
    factors, scale = read_draft_adapter(adapter_dir, model)
    merge_draft_adapter(model, factors, scale)


def merge_draft_adapter(model: NLDModel, factors: Factors, scale: float) -> None:
    for (i, name), (a, b) in factors.items():
        owner = getattr(model.encoder.layers[i], DRAFT_LINEARS[name])
        w = getattr(owner, name).weight
        merged = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
        twin = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        twin.weight = nn.Parameter(merged, requires_grad=False)
        setattr(owner, f"{name}_draft", twin)


def _lora_config(config_path: Path) -> tuple[int, float, list[str]]:
    """-> (r, the LoRA scale, the target linears in DRAFT_LINEARS' order) from a PEFT
    adapter_config.json, every value checked."""
    try:
        cfg = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{config_path}: not a readable LoRA adapter config ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object")
    r, alpha, rslora = cfg.get("r"), cfg.get("lora_alpha"), cfg.get("use_rslora", False)
    if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= 65536:
        raise CheckpointError(f"{config_path}: key 'r': expected an integer in [1, 65536], got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise CheckpointError(f"{config_path}: key 'lora_alpha': expected a finite number, got {alpha!r}")
    if not isinstance(rslora, bool):
        raise CheckpointError(f"{config_path}: key 'use_rslora': expected true or false, got {rslora!r}")
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    names = {str(t).rpartition(".")[2] for t in targets} if isinstance(targets, list) else set()
    if not names or not names <= DRAFT_LINEARS.keys():
        raise CheckpointError(
            f"{config_path}: key 'target_modules': expected a list of the layers' linears "
            f"({', '.join(DRAFT_LINEARS)}), got {targets!r}"
        )
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise CheckpointError(
                f"{config_path}: key {key!r}: per-module ranks and alphas are not supported; "
                f"every target module must share 'r' and 'lora_alpha'"
            )
    return r, alpha / r**0.5 if rslora else alpha / r, [n for n in DRAFT_LINEARS if n in names]
