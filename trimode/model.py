"""Reference NLD model in PyTorch (spec §1-§4) behind the one-forward contract of design.md.

forward(tokens [b, L], cache, kind, rows) runs one chunk at the absolute positions
cache.lengths[rows] + 0..L-1, writes the chunk's K/V, and returns logits. The pass kind fixes the
attention pattern and whether the draft adapter is on. It never advances the cache: the mode
policies decide what a pass commits. No data-dependent Python control flow lives here, so the
forward exports to ONNX as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from trimode.config import ModelSpec
from trimode.fp8 import E4M3, fake_quant_e4m3
from trimode.kv_cache import KVCache
from trimode.passes import PassKind, Pattern
from trimode.plugins.ops import block_attention
from trimode.plugins.reference import ChunkLayout
from trimode.rope import apply_rope, llama4_query_scale, rope_cos_sin, rope_frequencies

# The linears of a layer a draft adapter may adapt, by the submodule that owns them. NVIDIA's adapter
# adapts o_proj alone (spec §2); trimode's loader and trainer take any of these. Each adapted linear
# gets a merged draft twin, `<name>_draft` on its owner, that only the self-spec draft pass reads.
DRAFT_LINEARS = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}


def linear(owner: nn.Module, name: str, use_draft: bool | slice):
    """owner.<name>, or in the draft pass its draft twin when the adapter adapts it. use_draft: a
    PassKind.draft_rows (a slice of the chunk: the twin for those rows, owner.<name> for the rest)."""
    twin = getattr(owner, f"{name}_draft") if use_draft is not False else None
    base = getattr(owner, name)
    if twin is None or use_draft is True:
        return base if twin is None else twin
    assert isinstance(use_draft, slice)
    start = use_draft.start  # a quadratic pass: the verify chain, then the masks

    def per_row(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([base(x[:, :start]), twin(x[:, start:])], dim=1)

    return per_row


def draft_twins(model: "NLDModel") -> dict[tuple[int, str], nn.Module]:
    """(layer index, linear name) -> the merged draft twin, for every linear the adapter adapts."""
    return {
        (i, name): twin
        for i, layer in enumerate(model.encoder.layers)
        for name, owner in DRAFT_LINEARS.items()
        if (twin := getattr(getattr(layer, owner), f"{name}_draft")) is not None
    }


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32, cast back, then scale (the Mistral / Hugging Face order)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            spec.num_attention_heads,
            spec.num_key_value_heads,
            spec.head_dim,
        )
        self.rope = spec.rope
        self.q_proj = nn.Linear(spec.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(spec.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(spec.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, spec.hidden_size, bias=False)
        # Merged draft twins (DRAFT_LINEARS): used only by the self-speculation draft pass.
        self.q_proj_draft = self.k_proj_draft = self.v_proj_draft = self.o_proj_draft = None
        # FP8 KV cache (an FP8 checkpoint's k_scale / v_scale): K/V are rounded through E4M3.
        self.k_scale: torch.Tensor | None = None
        self.v_scale: torch.Tensor | None = None

    def project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_scale: torch.Tensor, use_draft: bool | slice
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [b, L, hidden] -> q [b, L, H, D], k and v [b, L, Hkv, D], rotated and scaled (spec §3)."""
        q, k, v = (linear(self, name, use_draft)(x) for name in ("q_proj", "k_proj", "v_proj"))
        return self.heads(q, k, v, cos, sin, q_scale)

    def heads(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        q_scale: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The projections q [b, L, H*D], k and v [b, L, Hkv*D] split into heads, rotated and scaled."""
        b, L, _ = q.shape
        q = q.view(b, L, self.num_heads, self.head_dim)
        k = k.view(b, L, self.num_kv_heads, self.head_dim)
        v = v.view(b, L, self.num_kv_heads, self.head_dim)
        k = apply_rope(k, cos, sin)
        if self.k_scale is not None:  # what an FP8 cache would hold
            assert self.v_scale is not None  # an FP8 checkpoint sets both (checkpoint.py)
            k, v = fake_quant_e4m3(k, self.k_scale), fake_quant_e4m3(v, self.v_scale)
        return apply_rope(q, cos, sin) * q_scale.to(q.dtype), k, v

    def output(self, attn: torch.Tensor, use_draft: bool | slice) -> torch.Tensor:
        return linear(self, "o_proj", use_draft)(attn.flatten(2))

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        q_scale: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        layout: ChunkLayout,
        use_draft: bool | slice,
    ) -> torch.Tensor:
        q, k, v = self.project(x, cos, sin, q_scale, use_draft)
        attn = block_attention(q, k, v, k_cache, v_cache, layout, self.k_scale, self.v_scale)
        return self.output(attn, use_draft)


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.gate_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=False)
        self.up_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=False)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=False)
        self.gate_proj_draft = self.up_proj_draft = self.down_proj_draft = None  # draft twins (DRAFT_LINEARS)

    def forward(self, x: torch.Tensor, use_draft: bool | slice = False) -> torch.Tensor:
        gate, up, down = (linear(self, name, use_draft) for name in ("gate_proj", "up_proj", "down_proj"))
        return down(F.silu(gate(x)) * up(x))


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MLP(spec)


class Encoder(nn.Module):
    """The backbone; its parameter names are the checkpoint's `encoder.*` names."""

    layers: Sequence[DecoderLayer]  # an nn.ModuleList, typed by what it holds

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = cast(
            Sequence[DecoderLayer], nn.ModuleList(DecoderLayer(spec) for _ in range(spec.num_hidden_layers))
        )
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)


class NLDModel(nn.Module):
    inv_freq: torch.Tensor  # a buffer

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.encoder = Encoder(spec)
        self.diffusion_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        inv_freq, self.rope_attn_scale = rope_frequencies(spec.rope, spec.head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @property
    def has_draft_adapter(self) -> bool:
        return bool(draft_twins(self))

    @property
    def dtype(self) -> torch.dtype:
        return self.diffusion_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.diffusion_head.weight.device

    def forward(
        self,
        tokens: torch.Tensor,
        cache: KVCache,
        kind: PassKind,
        rows: torch.Tensor | None = None,
        logit_index: torch.Tensor | None = None,
        length_range: tuple[int, int] | None = None,
        kernels: bool | None = None,
    ) -> torch.Tensor:
        """tokens [b, L] for cache slots `rows` (None = every slot). -> logits [b, L, V] in fp32,
        or [b, 1, V] at chunk index logit_index [b] (prefill needs only each row's last logit).
        length_range: (min, max) of the rows' lengths when the caller knows them (no host sync);
        kernels: run the plugins' kernels (None: plugins.ops.use_kernels decides per call)."""
        lengths = cache.lengths if rows is None else cache.lengths[rows]
        tables = cache.block_tables if rows is None else cache.block_tables[rows]
        use_draft = kind.draft_rows(tokens.shape[1])
        layout = ChunkLayout.build(
            lengths,
            tables,
            tokens.shape[1],
            kind.pattern != Pattern.BLOCK,
            length_range,
            kernels,
            kind.row_width(tokens.shape[1]),
        )

        def attend(i: int, attn: Attention, x, cos, sin, q_scale):
            return attn(x, cos, sin, q_scale, cache.k[i], cache.v[i], layout, use_draft)

        h = self._layers(tokens, layout.positions, attend, use_draft)
        if logit_index is not None:
            h = h[torch.arange(h.shape[0], device=h.device), logit_index][:, None]
        return self.diffusion_head(self.encoder.norm(h)).float()

    def forward_masked(
        self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, use_draft: bool = False
    ) -> torch.Tensor:
        """Cache-free pass with an explicit attention mask (training, spec §9).
        tokens, positions [b, T]; mask [b, T, T] bool (True = may attend). -> logits [b, T, V]."""

        def attend(i: int, attn: Attention, x, cos, sin, q_scale):
            q, k, v = attn.project(x, cos, sin, q_scale, use_draft)
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                attn_mask=mask[:, None],
                enable_gqa=q.shape[2] != k.shape[2],
            )
            return attn.output(out.transpose(1, 2), use_draft)

        return self.diffusion_head(self.encoder.norm(self._layers(tokens, positions, attend, use_draft))).float()

    def _layers(self, tokens: torch.Tensor, positions: torch.Tensor, attend, use_draft: bool | slice) -> torch.Tensor:
        cos, sin = rope_cos_sin(positions, self.inv_freq, self.rope_attn_scale, self.dtype)
        q_scale = llama4_query_scale(positions, self.spec.rope)
        h = self.encoder.embed_tokens(tokens)
        for i, layer in enumerate(self.encoder.layers):
            h = h + attend(i, layer.self_attn, layer.input_layernorm(h), cos, sin, q_scale)
            h = h + layer.mlp(layer.post_attention_layernorm(h), use_draft)
        return h

    @property
    def kv_dtype(self) -> torch.dtype:
        """An FP8 checkpoint with K/V scales gets a float8 cache (codes; value = code * scale)."""
        return E4M3 if self.encoder.layers[0].self_attn.k_scale is not None else self.dtype

    def new_cache(
        self, num_slots: int, max_len: int, block_size: int | None = None, num_blocks: int | None = None
    ) -> KVCache:
        """A dense pool (one block of max_len per slot) unless block_size is given (kv_cache.py)."""
        return KVCache.allocate(self.spec, num_slots, max_len, self.kv_dtype, self.device, block_size, num_blocks)
