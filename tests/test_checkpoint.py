"""The NLD checkpoint reader: layout, sharding, the draft adapter, memory mapping, bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from trimode.checkpoint import load_checkpoint
from trimode.errors import CheckpointError, ConfigError
from trimode.make_checkpoint import make_random_checkpoint, write_draft_adapter
from trimode.model import DRAFT_LINEARS, draft_twins


def test_nld_names_and_dtypes_on_disk(tiny_dir):
    with safe_open(str(tiny_dir / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("diffusion_head.weight").dtype == torch.bfloat16
    assert "encoder.embed_tokens.weight" in names and "encoder.norm.weight" in names
    assert "encoder.layers.1.self_attn.o_proj.weight" in names
    assert all(n.startswith(("encoder.", "diffusion_head.")) for n in names)
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["model_type"] == "nemotron_labs_diffusion"
    assert config["architectures"] == ["NemotronLabsDiffusionModel"]
    assert config["rope_parameters"]["rope_type"] == "yarn"


def test_sharded_loads_the_same_as_single(tmp_path):
    single = load_checkpoint(make_random_checkpoint(tmp_path / "a", seed=3))
    sharded = load_checkpoint(make_random_checkpoint(tmp_path / "b", seed=3, num_shards=3))
    assert len(list((tmp_path / "b").glob("model-*.safetensors"))) == 3
    for (name, a), (_, b) in zip(single.model.state_dict().items(), sharded.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_draft_adapter_is_merged_by_hand(tiny_adapter_dir, tiny_adapter):
    cfg = json.loads((tiny_adapter_dir / "linear_spec_lora" / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    with safe_open(str(tiny_adapter_dir / "linear_spec_lora" / "adapter_model.safetensors"), "pt") as f:
        prefix = "base_model.model.encoder.layers.1.self_attn.o_proj"
        a, b = f.get_tensor(f"{prefix}.lora_A.weight").float(), f.get_tensor(f"{prefix}.lora_B.weight").float()
    attn = tiny_adapter.model.encoder.layers[1].self_attn
    torch.testing.assert_close(attn.o_proj_draft.weight, attn.o_proj.weight + scale * b @ a)
    assert tiny_adapter.model.has_draft_adapter


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_weight_dtypes_load(tmp_path, dtype):
    from safetensors.torch import load_file, save_file

    d = make_random_checkpoint(tmp_path / "c", seed=2)
    state = {k: v.to(dtype) for k, v in load_file(str(d / "model.safetensors")).items()}
    save_file(state, str(d / "model.safetensors"))
    ck = load_checkpoint(d, dtype=dtype)
    assert ck.model.diffusion_head.weight.dtype == dtype
    assert torch.equal(ck.model.diffusion_head.weight, state["diffusion_head.weight"])


def test_weights_are_memory_mapped_not_copied(tiny_dir):
    """Loaded in the file's own dtype on CPU, every parameter lies in a mapping of the weights file."""
    ck = load_checkpoint(tiny_dir, dtype=torch.bfloat16)
    weights_file = str((tiny_dir / "model.safetensors").resolve())
    regions = []
    for line in open("/proc/self/maps"):
        fields = line.split()
        if len(fields) >= 6 and fields[5] == weights_file:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            regions.append((start, end))
    assert regions
    for name, p in ck.model.named_parameters():
        assert any(start <= p.data_ptr() < end for start, end in regions), name


def _mutate_config(d, **changes):
    path = d / "config.json"
    config = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            config.pop(k)
        else:
            config[k] = v
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "change, error, message",
    [
        ({"model_type": "llama"}, ConfigError, "'model_type'.*'llama'"),
        ({"hidden_size": -3}, ConfigError, "'hidden_size'.*-3"),
        ({"num_hidden_layers": None}, ConfigError, "missing required key 'num_hidden_layers'"),
        ({"num_key_value_heads": 3}, ConfigError, "'num_key_value_heads'.*3"),
        ({"mask_token_id": 99999}, ConfigError, "'mask_token_id'.*99999"),
        ({"torch_dtype": "int4"}, ConfigError, "'torch_dtype'.*int4"),
        (
            {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 0}},
            ConfigError,
            "'rope_parameters.factor'.*0",
        ),
        ({"hidden_act": "gelu"}, ConfigError, "'hidden_act'"),
        ({"hidden_size": 128}, CheckpointError, "shape"),
        ({"vocab_size": 300}, CheckpointError, "tokens do not fit vocab_size=300"),
    ],
)
def test_bad_config_names_file_key_and_value(tiny_dir, tmp_path, change, error, message):
    d = tmp_path / "ck"
    shutil.copytree(tiny_dir, d)
    _mutate_config(d, **change)
    with pytest.raises(error, match=message) as info:
        load_checkpoint(d)
    assert str(d) in str(info.value)


@pytest.mark.parametrize(
    "remove, message",
    [
        ("config.json", "no config.json"),
        ("tokenizer.json", "no tokenizer.json"),
        ("model.safetensors", "no model.safetensors"),
    ],
)
def test_missing_files(tiny_dir, tmp_path, remove, message):
    d = tmp_path / "ck"
    shutil.copytree(tiny_dir, d)
    (d / remove).unlink()
    with pytest.raises((ConfigError, CheckpointError), match=message):
        load_checkpoint(d)


def test_missing_weight_is_named(tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "ck"
    shutil.copytree(tiny_dir, d)
    state = load_file(str(d / "model.safetensors"))
    del state["encoder.layers.1.mlp.up_proj.weight"]
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="encoder.layers.1.mlp.up_proj.weight"):
        load_checkpoint(d)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("target_modules", ["lm_head"], "target_modules.*expected a list of the layers' linears"),
        ("target_modules", [], "target_modules"),
        ("target_modules", ["q_proj"], "no LoRA A/B for layer 0 q_proj"),  # declared, but its tensors are not there
        ("rank_pattern", {"o_proj": 2}, "rank_pattern.*not supported"),
    ],
)
def test_an_adapter_config_that_does_not_match_its_tensors_is_refused(tiny_adapter_dir, tmp_path, key, value, message):
    d = tmp_path / "ck"
    shutil.copytree(tiny_adapter_dir, d)
    cfg_path = d / "linear_spec_lora" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg[key] = value
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(d)


def test_an_adapter_on_more_linears_merges_a_draft_twin_of_each(tiny_dir, tmp_path):
    """PEFT target_modules beyond o_proj (attention and MLP linears): each adapted linear of every
    layer gets its twin W + scale * B @ A; the others have none, and the base linears are untouched."""
    d = tmp_path / "ck"
    shutil.copytree(tiny_dir, d)
    base = load_checkpoint(tiny_dir).model
    gen = torch.Generator().manual_seed(0)
    names = ("k_proj", "o_proj", "up_proj", "down_proj")
    factors = {}
    for i, layer in enumerate(base.encoder.layers):
        for name in names:
            w = getattr(getattr(layer, DRAFT_LINEARS[name]), name).weight
            factors[i, name] = (torch.randn(3, w.shape[1], generator=gen), torch.randn(w.shape[0], 3, generator=gen))
    write_draft_adapter(d / "linear_spec_lora", factors, alpha=1.5)
    assert json.loads((d / "linear_spec_lora" / "adapter_config.json").read_text())["target_modules"] == list(names)
    model = load_checkpoint(d).model
    twins = draft_twins(model)
    assert sorted(twins) == sorted(factors) and model.has_draft_adapter
    for (i, name), (a, b) in factors.items():
        w = getattr(getattr(model.encoder.layers[i], DRAFT_LINEARS[name]), name).weight
        a, b = a.to(torch.bfloat16).float(), b.to(torch.bfloat16).float()  # as stored
        torch.testing.assert_close(twins[i, name].weight, w + 0.5 * b @ a)
    state = model.state_dict()
    for name, t0 in base.state_dict().items():
        assert torch.equal(state[name], t0), name
    assert not draft_twins(base)
