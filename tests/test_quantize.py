"""FP8 quantization with ModelOpt: the export read back by hand, the FP8 runtime, bad input."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from safetensors import safe_open

from trimode.checkpoint import load_checkpoint
from trimode.cli import main
from trimode.decoding import GenerationSettings, Mode, generate
from trimode.fp8 import FP8Linear, quantize_e4m3
from trimode.model import DRAFT_LINEARS, draft_twins
from trimode.passes import PassKind
from trimode.quantize import QuantizeSettings, quantize_checkpoint
from trimode.quantize.recipe import CALIBRATION_PASSES

SMALL = QuantizeSettings(calib_samples=6, calib_seq_len=48, calib_batch_size=3)
LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "self_attn.o_proj_draft",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


@pytest.fixture(scope="module")
def fp8_dir(tiny_adapter_dir, tmp_path_factory):
    return quantize_checkpoint(tiny_adapter_dir, tmp_path_factory.mktemp("q") / "fp8", SMALL)


def tensors(path):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def test_export_layout_read_directly(fp8_dir, tiny_adapter_dir, tiny_adapter):
    t = tensors(fp8_dir)
    for i in range(tiny_adapter.spec.num_hidden_layers):
        for linear in LINEARS:
            prefix = f"encoder.layers.{i}.{linear}"
            assert t[f"{prefix}.weight"].dtype == torch.float8_e4m3fn, prefix
            for scale in ("weight_scale", "input_scale"):
                assert t[f"{prefix}.{scale}"].dtype == torch.float32 and t[f"{prefix}.{scale}"].dim() == 0
        for kv in ("k_proj.k_scale", "v_proj.v_scale"):
            assert t[f"encoder.layers.{i}.self_attn.{kv}"].dim() == 0
    for name in ("encoder.embed_tokens.weight", "diffusion_head.weight", "encoder.norm.weight"):
        assert t[name].dtype == torch.bfloat16, name
    assert not any("quantizer" in name for name in t)
    quant = json.loads((fp8_dir / "hf_quant_config.json").read_text())["quantization"]
    assert quant == {
        "quant_algo": "FP8",
        "kv_cache_quant_algo": "FP8",
        "exclude_modules": ["diffusion_head", "encoder.embed_tokens"],
    }
    config = json.loads((fp8_dir / "config.json").read_text())
    assert config["model_type"] == "nemotron_labs_diffusion"
    assert config["quantization_config"]["quant_algo"] == "FP8"
    assert (fp8_dir / "tokenizer.json").read_bytes() == (tiny_adapter_dir / "tokenizer.json").read_bytes()


def test_dequantized_by_hand_matches_the_source_weights(fp8_dir, tiny_adapter):
    t = tensors(fp8_dir)
    for i, layer in enumerate(tiny_adapter.model.encoder.layers):
        for linear in LINEARS:
            source = layer.get_submodule(linear).weight.float()
            prefix = f"encoder.layers.{i}.{linear}"
            scale = t[f"{prefix}.weight_scale"]
            torch.testing.assert_close(scale * 448, source.abs().max(), rtol=1e-6, atol=0)  # max calibration
            codes = (source * (448 / source.abs().max())).to(torch.float8_e4m3fn)
            assert torch.equal(t[f"{prefix}.weight"].view(torch.uint8), codes.view(torch.uint8))
            by_hand = t[f"{prefix}.weight"].float() * scale
            assert ((by_hand - source).abs() <= source.abs() / 16 + scale).all()  # E4M3: 3 mantissa bits


def test_manifest_records_calibration_over_every_pass(fp8_dir, tiny_adapter_dir):
    from trimode.stage_output import input_digest

    manifest = json.loads((fp8_dir / "manifest.json").read_text())
    assert manifest["input"]["digest_sha256"] == input_digest(tiny_adapter_dir)
    assert set(manifest["calibration"]["passes"]) == {kind.value for kind in CALIBRATION_PASSES}
    assert set(manifest["calibration"]["passes"]) == {
        "prefill",
        "decode",
        "denoise",
        "draft",
        "verify",
        "refresh",
        "quadratic",
    }
    assert manifest["calibration"]["num_tokens"] == 6 * 48
    assert manifest["versions"]["modelopt"] and manifest["recipe"]["kv_cache"] == "fp8"
    assert "diffusion_head (bf16)" in manifest["recipe"]["not_quantized"]


@pytest.fixture(scope="module")
def fp8(fp8_dir):
    return load_checkpoint(fp8_dir)


def test_runtime_loads_fp8_modules(fp8):
    attn = fp8.model.encoder.layers[0].self_attn
    assert isinstance(attn.q_proj, FP8Linear) and isinstance(attn.o_proj_draft, FP8Linear)
    assert isinstance(fp8.model.encoder.layers[1].mlp.down_proj, FP8Linear)
    assert attn.k_scale is not None and attn.v_scale is not None
    assert fp8.model.diffusion_head.weight.dtype == torch.float64  # CPU default for FP8: see default_dtype
    cache = fp8.model.new_cache(2, 8)  # the KV cache holds E4M3 codes: a quarter of fp32's memory
    assert all(t.dtype == torch.float8_e4m3fn for t in cache.k + cache.v)


def test_fp8_runtime_equals_modelopt_fake_quant(tiny_adapter_dir, tmp_path):
    """The exported checkpoint, run by our FP8 runtime, gives the logits of ModelOpt's calibrated model."""
    from trimode.quantize.calibration import calibration_windows, read_calibration_texts
    from trimode.quantize.export import write_fp8_checkpoint
    from trimode.quantize.recipe import quantize_model

    ck = load_checkpoint(tiny_adapter_dir)
    windows = calibration_windows(read_calibration_texts(None)[0][:4], ck.tokenizer, ck.spec, 4, 48)
    quantized, _ = quantize_model(ck.model, windows, 8, kv_cache=True)
    out = tmp_path / "fp8"
    shutil.copytree(tiny_adapter_dir, out, ignore=shutil.ignore_patterns("linear_spec_lora", "model*.safetensors*"))
    write_fp8_checkpoint(quantized, json.loads((tiny_adapter_dir / "config.json").read_text()), out, kv_cache=True)
    ours = load_checkpoint(out).model
    tokens = torch.randint(5, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    for kind in [PassKind.VERIFY, PassKind.DENOISE, PassKind.DRAFT]:
        with torch.no_grad():
            expected = quantized(tokens, quantized.new_cache(2, 20), kind)
            got = ours(tokens, ours.new_cache(2, 20), kind)
        torch.testing.assert_close(got, expected, atol=2e-3, rtol=0)


def test_scaled_mm_equals_the_simulation(fp8):
    """torch._scaled_mm (the GEMM the CUDA path runs) on the FP8 codes equals the CPU simulation."""
    layer = fp8.model.encoder.layers[0].mlp.up_proj
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(layer.scaled_mm(x), layer(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_length", [4, 8])
def test_self_spec_still_equals_ar_on_fp8(fp8, block_length):
    prompts = [fp8.tokenizer.encode(t) for t in ("def f(x):", "The quick brown fox", "A")]
    ar = generate(fp8.model, prompts, GenerationSettings(mode=Mode.AR, max_new_tokens=24))
    spec = generate(
        fp8.model, prompts, GenerationSettings(mode=Mode.SELF_SPEC, max_new_tokens=24, block_length=block_length)
    )
    assert [r.tokens for r in spec] == [r.tokens for r in ar]


def test_self_spec_equals_ar_on_the_fp8_trained_checkpoint(trained, tmp_path):
    """The case that once failed: FP8 rounding amplifies fp32 shape-dependent noise (1 in 16 held-out
    sequences diverged); the fp64 CPU default keeps self-spec == AR."""
    from trimode.evaluate import held_out_prompts, held_out_stream

    fp8 = load_checkpoint(quantize_checkpoint(trained.checkpoint_dir, tmp_path / "fp8"))  # default recipe
    prompts = held_out_prompts(held_out_stream(fp8), 16, 64)
    base = dict(max_new_tokens=64, ignore_eos=True)
    ar = generate(fp8.model, prompts, GenerationSettings(mode=Mode.AR, **base))
    spec = generate(fp8.model, prompts, GenerationSettings(mode=Mode.SELF_SPEC, block_length=8, **base))
    assert [r.tokens for r in spec] == [r.tokens for r in ar]


def test_quantize_e4m3_saturates():
    codes = quantize_e4m3(torch.tensor([1e4, -1e4, 0.5]), torch.tensor(1.0))
    assert codes.float().tolist() == [448.0, -448.0, 0.5]


def test_cli_json_and_kv_none(runner, tiny_dir, tmp_path):
    out = tmp_path / "q"
    result = runner.invoke(
        main,
        [
            "quantize",
            str(tiny_dir),
            "--out",
            str(out),
            "--kv-cache",
            "none",
            "--calib-samples",
            "4",
            "--calib-seq-len",
            "32",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert manifest["recipe"]["kv_cache"] == "none" and "draft" not in manifest["calibration"]["passes"]
    assert not any(name.endswith("k_scale") for name in tensors(out))
    assert json.loads((out / "hf_quant_config.json").read_text())["quantization"]["kv_cache_quant_algo"] is None


def _non_nld(tiny_dir, tmp_path):
    d = tmp_path / "llama"
    shutil.copytree(tiny_dir, d)
    config = json.loads((d / "config.json").read_text())
    config["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(config))
    return d


@pytest.mark.parametrize(
    "case, message",
    [
        ("non-nld", "'model_type'"),
        ("quantized", "already quantized"),
        ("empty calib", "no text to calibrate on"),
        ("missing calib", "no such file or folder"),
        ("exists", "exists and is not empty (--force replaces a previous quantize output)"),
        ("bad samples", "Invalid value for '--calib-samples'"),
    ],
)
def test_bad_input_writes_nothing(runner, tiny_dir, fp8_dir, tmp_path, case, message):
    source, out, extra = tiny_dir, tmp_path / "out", []
    if case == "non-nld":
        source = _non_nld(tiny_dir, tmp_path)
    elif case == "quantized":
        source = fp8_dir
    elif case == "empty calib":
        (tmp_path / "empty.txt").write_text("  \n")
        extra = ["--calib-data", str(tmp_path / "empty.txt")]
    elif case == "missing calib":
        extra = ["--calib-data", str(tmp_path / "nope.txt")]
    elif case == "exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "bad samples":
        extra = ["--calib-samples", "0"]
    before = sorted(p.name for p in tmp_path.iterdir())
    result = runner.invoke(main, ["quantize", str(source), "--out", str(out), *extra])
    assert result.exit_code == (2 if case == "bad samples" else 1), result.output  # 2: a usage error
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temporary sibling
    if case == "exists":
        assert (out / "keep.txt").read_text() == "mine"


def test_binary_calibration_data_is_refused(refused, tiny_dir, tmp_path):
    """--calib-data that is not UTF-8 text is an Error naming the file, not text of replacement characters."""
    data = tmp_path / "calib.txt"
    data.write_bytes(random.Random(0).randbytes(4096))
    error = refused(
        [
            "quantize",
            tiny_dir,
            "--out",
            tmp_path / "out",
            "--calib-data",
            data,
            "--calib-samples",
            2,
            "--calib-seq-len",
            32,
        ],
        tmp_path,
        "not UTF-8 text",
    ).error
    assert str(data) in error and "--calib-data" in error


def test_calib_seq_len_past_max_position_embeddings_is_refused(refused, tiny_dir, tmp_path):
    """Calibration windows longer than the checkpoint's positions are refused, naming the option and the limit."""
    ck = tmp_path / "ck"
    shutil.copytree(tiny_dir, ck)
    config = json.loads((ck / "config.json").read_text())
    config["max_position_embeddings"] = 64
    (ck / "config.json").write_text(json.dumps(config))
    error = refused(
        ["quantize", ck, "--out", tmp_path / "out", "--calib-samples", 2, "--calib-seq-len", 65],
        tmp_path,
        "--calib-seq-len",
    ).error
    assert "max_position_embeddings" in error and "64" in error


def test_an_adapter_on_every_linear_keeps_an_fp8_draft_twin_of_each(tiny_wide_adapter_dir, tiny_wide_adapter, tmp_path):
    """Each draft twin is calibrated by the draft pass and exported as FP8 under `<linear>_draft`;
    the FP8 runtime loads them all, and its self-spec still emits its AR tokens."""
    out = quantize_checkpoint(tiny_wide_adapter_dir, tmp_path / "fp8", SMALL)
    t = tensors(out)
    twins = draft_twins(tiny_wide_adapter.model)
    for i, name in twins:
        assert t[f"encoder.layers.{i}.{DRAFT_LINEARS[name]}.{name}_draft.weight"].dtype == torch.float8_e4m3fn
    fp8 = load_checkpoint(out)
    loaded = draft_twins(fp8.model)
    assert sorted(loaded) == sorted(twins) and all(isinstance(m, FP8Linear) for m in loaded.values())
    prompts = [fp8.tokenizer.encode(p) for p in ("def f(x):", "import os\n")]
    tokens = {
        mode: [
            s.tokens
            for s in generate(
                fp8.model, prompts, GenerationSettings(mode=mode, max_new_tokens=16, block_length=4, ignore_eos=True)
            )
        ]
        for mode in (Mode.AR, Mode.SELF_SPEC)
    }
    assert tokens[Mode.SELF_SPEC] == tokens[Mode.AR]
