"""Tiny random checkpoints in the exact NLD layout (spec §2), for tests and demos."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from trimode import __version__
from trimode.checkpoint import Factors
from trimode.config import ModelSpec, RopeSpec
from trimode.errors import InputError
from trimode.model import DRAFT_LINEARS, NLDModel
from trimode.stage_output import stage_output, write_manifest

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<mask>"]  # ids 0..4

TINY_SPEC = ModelSpec(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    mask_token_id=4,
    eos_token_ids=(2,),
    bos_token_id=1,
    pad_token_id=3,
    max_position_embeddings=4096,
    block_size=8,
    # A small original context so generation crosses it and the Llama-4 query scaling is exercised.
    rope=RopeSpec(rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32),
)

_CORPUS = """\
A diffusion language model drafts a whole block of tokens at once and refines it over a few steps.
An autoregressive model writes one token per forward pass, each conditioned on all before it.
Self-speculation drafts a block by diffusion and verifies it autoregressively in a single pass,
keeping the longest prefix the verifier agrees with, plus one bonus token from the verifier itself.
def generate(prompt, max_new_tokens=32):
    tokens = tokenize(prompt)
    for step in range(max_new_tokens):
        tokens.append(model(tokens).argmax())
    return detokenize(tokens)
The quick brown fox jumps over the lazy dog; 0123456789 and some punctuation: (){}[]<>!?,.;:'"
"""


def write_tokenizer(
    out_dir: Path, vocab_size: int, texts: list[str] | None = None, chat_template: str | None = None
) -> None:
    """A byte-level BPE tokenizer trained on `texts` (default: a built-in paragraph), specials at ids 0..4;
    chat_template (None: none, so chat requests are refused) goes into tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts or [_CORPUS] * 4, trainer=trainer)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "pad_token": "<pad>",
                "mask_token": "<mask>",
                "unk_token": "<unk>",
                **({"chat_template": chat_template} if chat_template else {}),
            },
            indent=2,
        )
        + "\n"
    )


def make_random_checkpoint(
    out_dir: Path,
    spec: ModelSpec = TINY_SPEC,
    seed: int = 0,
    with_draft_adapter: bool = False,
    num_shards: int = 1,
    init_std: float = 0.02,
    force: bool = False,
) -> Path:
    """Write config.json, safetensors (bf16), tokenizer, manifest.json and, optionally, a draft LoRA
    adapter, through `stage_output` (force replaces only a previous make-checkpoint output)."""
    with stage_output(out_dir, "make-checkpoint", force=force) as tmp:
        gen = torch.Generator().manual_seed(seed)
        model = NLDModel(spec)
        state = {}
        for name, p in model.state_dict().items():
            if name.endswith("norm.weight") or "layernorm" in name:
                w = 1 + 0.1 * torch.randn(p.shape, generator=gen)
            else:
                w = init_std * torch.randn(p.shape, generator=gen)
            state[name] = w.to(torch.bfloat16).contiguous()
        if not 1 <= num_shards <= len(state):
            raise InputError(
                f"num_shards: expected 1 to {len(state)} (one tensor per shard at least), got {num_shards}"
            )
        (tmp / "config.json").write_text(json.dumps(spec.to_dict(), indent=2) + "\n")
        save_weights(state, tmp, num_shards)
        write_tokenizer(tmp, spec.vocab_size)
        if with_draft_adapter:
            _write_adapter(tmp / "linear_spec_lora", spec, gen)
        write_manifest(
            tmp,
            {
                "stage": "make-checkpoint",
                "tool": f"trimode {__version__}",
                "settings": {
                    "seed": seed,
                    "init_std": init_std,
                    "num_shards": num_shards,
                    "with_draft_adapter": with_draft_adapter,
                },
            },
        )
    return Path(out_dir)


def save_weights(state: dict[str, torch.Tensor], out_dir: Path, num_shards: int) -> None:
    if num_shards <= 1:
        save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return
    names = list(state)
    weight_map = {}
    for s in range(num_shards):
        shard = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {n: state[n] for n in names[s::num_shards]}
        save_file(part, str(out_dir / shard), metadata={"format": "pt"})
        weight_map.update({n: shard for n in part})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (out_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
    )


def _write_adapter(adapter_dir: Path, spec: ModelSpec, gen: torch.Generator, r: int = 4, alpha: float = 16.0) -> None:
    width = spec.num_attention_heads * spec.head_dim
    factors = {
        (i, "o_proj"): (
            0.05 * torch.randn(r, width, generator=gen),
            0.05 * torch.randn(spec.hidden_size, r, generator=gen),
        )
        for i in range(spec.num_hidden_layers)
    }
    write_draft_adapter(adapter_dir, factors, alpha)


def write_draft_adapter(adapter_dir: Path, factors: Factors, alpha: float, dtype: torch.dtype = torch.bfloat16) -> None:
    """A PEFT LoRA (spec §2) on the linears `factors` names, every layer's: adapter_config.json +
    adapter_model.safetensors with PEFT's key names. NVIDIA's adapts o_proj alone."""
    adapter_dir = Path(adapter_dir)
    adapter_dir.mkdir(parents=True)
    state = {}
    for (i, name), (a, b) in factors.items():
        prefix = f"base_model.model.encoder.layers.{i}.{DRAFT_LINEARS[name]}.{name}"
        state[f"{prefix}.lora_A.weight"] = a.detach().to(dtype).contiguous()
        state[f"{prefix}.lora_B.weight"] = b.detach().to(dtype).contiguous()
    save_file(state, str(adapter_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    (adapter_dir / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "task_type": None,
                "r": next(iter(factors.values()))[0].shape[0],
                "lora_alpha": alpha,
                "target_modules": [n for n in DRAFT_LINEARS if any(name == n for _, name in factors)],
                "lora_dropout": 0.0,
                "bias": "none",
                "fan_in_fan_out": False,
                "use_rslora": False,
                "inference_mode": True,
            },
            indent=2,
        )
        + "\n"
    )


def tiny_spec(**overrides) -> ModelSpec:
    return dataclasses.replace(TINY_SPEC, **overrides)
