"""Decoder blocks in plain torch, so a pipeline stage runs an HF causal LM without transformers.

A stage actor needs only a slice's forward pass, yet importing transformers' model classes costs
a fresh worker 2-3 s of CPU (``modeling_utils``, generation, integrations), on the critical path
of every run's start-up. For the common architectures the forward is small, so this module
re-states it in torch alone and builds the skeleton from ``config.json`` read as JSON (data,
never code):

- ``"llama"`` family (``llama``, ``mistral``, ``qwen2``, ``qwen3``), every layer full causal
  attention: ``h += o(attn(rmsnorm(h)))``, ``h += down(silu(gate(x)) * up(x))`` with
  ``x = rmsnorm(h)``; RMSNorm in float32 then cast back, ``w * (h / sqrt(mean(h²) + eps))``;
  rotary positions of type ``default``, ``linear`` or ``llama3`` (``cos``/``sin`` in float32,
  cast to the hidden dtype); grouped KV heads repeated per query group; qwen3's per-head q/k
  RMSNorm before the rotation; qwen2's q/k/v bias.
- ``"gpt2"``: pre-LN blocks with ``Conv1D`` (``y = x W + b``, ``W`` stored ``[in, out]``),
  learned positions, ``gelu_new`` (the tanh approximation, written out as transformers does).

Attention is ``torch.nn.functional.scaled_dot_product_attention`` with the same boolean mask
(causal and key padding) that transformers builds for its ``sdpa`` implementation, which is what
it runs by default, so hidden states agree to float rounding; the tests hold every family to
the transformers model's logits. Anything else (sliding windows, other rotary types, partial
rotary, other activations, ``reorder_and_upcast_attn``…) returns ``None`` from
:func:`native_model` and loads through transformers as before.

Module names, parameter shapes and tied embeddings are the HF model's, so checkpoints load by
key (:func:`~engram_ray.models.weights.materialize`) and statistics and engrams carry the
unsplit model's names.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engram_ray.core.layers import Conv1D
from engram_ray.models.base import DecoderStage

__all__ = ["NativeDecoderStage", "native_model"]

# Per model_type, where each bias comes from: a config key (read as transformers reads it) or a
# constant the architecture fixes; qwen3 also normalises q and k per head.
LLAMA_LAYOUT: dict[str, dict[str, Any]] = {
    "llama": {"qkv_bias": "attention_bias", "o_bias": "attention_bias", "mlp_bias": "mlp_bias"},
    "mistral": {"qkv_bias": False, "o_bias": False, "mlp_bias": False},
    "qwen2": {"qkv_bias": True, "o_bias": False, "mlp_bias": False},
    "qwen3": {"qkv_bias": "attention_bias", "o_bias": "attention_bias", "mlp_bias": False,
              "qk_norm": True},
}
# Config keys read here with the config classes' defaults (transformers 5), for config.json
# files written before a key existed; tests/test_native_models.py checks them against the
# config classes. ``head_dim`` None means hidden / heads; qwen3's class default is 128.
LLAMA_DEFAULTS = {"rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False,
                  "num_key_value_heads": None, "head_dim": None, "pretraining_tp": 1,
                  "attention_bias": False, "mlp_bias": False}
QWEN3_HEAD_DIM = 128
GPT2_DEFAULTS = {"n_inner": None, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new",
                 "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                 "reorder_and_upcast_attn": False, "tie_word_embeddings": True,
                 "add_cross_attention": False}


def native_model(config: dict, dtype: torch.dtype | None = None) -> nn.Module | None:
    """The model of ``config`` (a parsed ``config.json``) with every parameter on the meta
    device, or ``None`` when this module does not cover it (load with transformers instead).

    ``dtype`` None builds float32, as transformers' ``from_config`` does.
    """
    kind = config.get("model_type")
    builder = _llama if kind in LLAMA_LAYOUT else _gpt2 if kind == "gpt2" else None
    if builder is None:
        return None
    cfg = builder(config)
    if cfg is None:
        return None
    with torch.device("meta"):
        model = (NativeLlama if kind in LLAMA_LAYOUT else NativeGPT2)(cfg)
    model.to(dtype or torch.float32)
    # Buffers are derived and not stored in checkpoints: build them for real.
    if isinstance(model, NativeLlama):
        model.model.rotary_emb.reset()
    return model


# ---------------------------------------------------------------- configs


def _rope(config: dict) -> dict | None:
    """Rotary parameters from transformers 5's ``rope_parameters`` or the older top-level
    ``rope_theta`` + ``rope_scaling``; ``None`` for a rotary type not covered here."""
    params = config.get("rope_parameters")
    if not isinstance(params, dict):
        params = dict(config.get("rope_scaling") or {})
        params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    params = dict(params)
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    if params["rope_type"] not in ("default", "linear", "llama3"):
        return None
    if float(params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))) != 1.0:
        return None
    return params


def _full_attention_only(config: dict) -> bool:
    """Every layer attends over the whole causal prefix (no sliding window), by the same rule
    :func:`~engram_ray.models.base.layer_type` applies to HF configs."""
    types = config.get("layer_types")
    if types:
        return all(t == "full_attention" for t in types)
    if config.get("use_sliding_window") is False:
        return True  # qwen2/qwen3 keep a window size that is off
    return not config.get("sliding_window")


def _llama(config: dict) -> SimpleNamespace | None:
    kind = config["model_type"]
    c = {**LLAMA_DEFAULTS, **({"head_dim": QWEN3_HEAD_DIM} if kind == "qwen3" else {}), **config}
    rope = _rope(config)
    if (rope is None or c["hidden_act"] != "silu" or int(c["pretraining_tp"]) != 1
            or not _full_attention_only(config)):
        return None
    layout = LLAMA_LAYOUT[kind]
    bias = {k: bool(c[v]) if isinstance(v, str) else v for k, v in layout.items()
            if k.endswith("_bias")}
    heads = int(c["num_attention_heads"])
    return SimpleNamespace(
        model_type=kind, vocab_size=int(c["vocab_size"]),
        hidden_size=int(c["hidden_size"]), intermediate_size=int(c["intermediate_size"]),
        num_hidden_layers=int(c["num_hidden_layers"]), num_attention_heads=heads,
        num_key_value_heads=int(c["num_key_value_heads"] or heads),
        head_dim=int(c["head_dim"] or int(c["hidden_size"]) // heads),
        rms_norm_eps=float(c["rms_norm_eps"]), qk_norm=bool(layout.get("qk_norm")), rope=rope,
        tie_word_embeddings=bool(c["tie_word_embeddings"]), layer_types=None, sliding_window=None,
        **bias,
    )


def _gpt2(config: dict) -> SimpleNamespace | None:
    c = {**GPT2_DEFAULTS, **config}
    if (c["activation_function"] != "gelu_new" or c["reorder_and_upcast_attn"]
            or c["add_cross_attention"]):
        return None
    return SimpleNamespace(
        model_type="gpt2", vocab_size=int(c["vocab_size"]), n_embd=int(c["n_embd"]),
        n_layer=int(c["n_layer"]), n_head=int(c["n_head"]), n_positions=int(c["n_positions"]),
        n_inner=int(c["n_inner"] or 4 * int(c["n_embd"])), eps=float(c["layer_norm_epsilon"]),
        scale=bool(c["scale_attn_weights"]), by_layer=bool(c["scale_attn_by_inverse_layer_idx"]),
        tie_word_embeddings=bool(c["tie_word_embeddings"]), layer_types=None,
        sliding_window=None,
    )


# ---------------------------------------------------------------- shared pieces


def causal_mask(attention_mask: torch.Tensor | None, t: int, device) -> torch.Tensor | None:
    """``None`` (plain causal, SDPA's ``is_causal``) when no key is padding, else the (B, 1, T,
    T) boolean mask ``key <= query and key is real`` that transformers gives its SDPA path."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    causal = torch.ones(t, t, dtype=torch.bool, device=device).tril()
    return causal[None, None] & attention_mask.bool()[:, None, None, :]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           scale: float) -> torch.Tensor:
    """SDPA over (B, heads, T, d) with KV heads repeated per query group; (B, T, heads·d)."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                         scale=scale)
    b, _, t, _ = out.shape
    return out.transpose(1, 2).reshape(b, t, -1)


class NativeDecoderStage(DecoderStage):
    """:class:`DecoderStage` over a native model: the same slice and names; masks built here
    (full causal attention only, which :func:`native_model` guarantees)."""

    def causal_masks(self, h, attention_mask, pos):
        return {"full_attention": causal_mask(attention_mask, h.shape[1], h.device)}


class _Skeleton(nn.Module):
    """What :mod:`~engram_ray.models.stages` asks of a model: ``config``, the embedding
    accessors (``"all-linear"`` leaves the head out) and ``base_model_prefix``."""

    base_model_prefix = ""

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head


# ---------------------------------------------------------------- llama family


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # Normalised in float32 whatever the hidden dtype, then cast back before the scale.
        x = h.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(h.dtype)


class Rotary(nn.Module):
    """``(cos, sin)`` of ``position · inv_freq``, each frequency twice, as (B, T, head_dim)."""

    def __init__(self, head_dim: int, rope: dict) -> None:
        super().__init__()
        self.head_dim, self.rope = head_dim, rope
        self.register_buffer("inv_freq", torch.empty(head_dim // 2), persistent=False)

    def reset(self) -> None:
        r, d = self.rope, self.head_dim
        # Frequencies base^(-2i/d) in float32 from int64 exponents, as transformers computes them.
        inv = 1.0 / (float(r["rope_theta"]) ** (torch.arange(0, d, 2, dtype=torch.int64)
                                                   .float() / d))
        if r["rope_type"] == "linear":
            inv = inv / float(r["factor"])
        elif r["rope_type"] == "llama3":
            inv = _llama3_frequencies(inv, r)
        self.inv_freq = inv

    def forward(self, h: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv = self.inv_freq[None, :, None].float().expand(pos.shape[0], -1, 1)
        freqs = (inv @ pos[:, None, :].float()).transpose(1, 2)  # float32 angles: exact enough
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(h.dtype), emb.sin().to(h.dtype)


def _llama3_frequencies(inv: torch.Tensor, r: dict) -> torch.Tensor:
    """Llama 3's long-context frequencies: long wavelengths divided by ``factor``, short ones
    kept, the band between interpolated smoothly."""
    factor, low, high = float(r["factor"]), float(r["low_freq_factor"]), float(r["high_freq_factor"])
    old = float(r["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) * ~(wavelen > old / low)
    return torch.where(medium, smoothed, scaled)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class LlamaAttention(nn.Module):
    def __init__(self, c: SimpleNamespace) -> None:
        super().__init__()
        d, h, kv = c.head_dim, c.num_attention_heads, c.num_key_value_heads
        self.head_dim, self.scale = d, d**-0.5
        self.q_proj = nn.Linear(c.hidden_size, h * d, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, kv * d, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, kv * d, bias=c.qkv_bias)
        self.o_proj = nn.Linear(h * d, c.hidden_size, bias=c.o_bias)
        if c.qk_norm:
            self.q_norm = RMSNorm(d, c.rms_norm_eps)
            self.k_norm = RMSNorm(d, c.rms_norm_eps)

    def forward(self, x, mask, cos, sin):
        shape = (*x.shape[:-1], -1, self.head_dim)  # (B, T, heads, d)
        q, k = self.q_proj(x).view(shape), self.k_proj(x).view(shape)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return self.o_proj(attend(_rotate(q, cos, sin), _rotate(k, cos, sin), v, mask,
                                  self.scale))


class LlamaMLP(nn.Module):
    def __init__(self, c: SimpleNamespace) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self, c: SimpleNamespace) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(c)
        self.mlp = LlamaMLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, h, attention_mask=None, position_ids=None, position_embeddings=None):
        cos, sin = position_embeddings
        h = h + self.self_attn(self.input_layernorm(h), attention_mask, cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))


class NativeLlama(_Skeleton):
    base_model_prefix = "model"

    def __init__(self, c: SimpleNamespace) -> None:
        super().__init__()
        self.config = c
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.model.layers = nn.ModuleList(LlamaBlock(c) for _ in range(c.num_hidden_layers))
        self.model.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.model.rotary_emb = Rotary(c.head_dim, c.rope)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens


# ---------------------------------------------------------------- gpt2


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh approximation of GELU, term by term as transformers' ``NewGELUActivation``
    (``torch``'s ``gelu(approximate="tanh")`` differs in the last bits)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class GPT2Attention(nn.Module):
    def __init__(self, c: SimpleNamespace, layer: int) -> None:
        super().__init__()
        self.heads, d = c.n_head, c.n_embd // c.n_head
        self.scale = (d**-0.5 if c.scale else 1.0) / (layer + 1 if c.by_layer else 1)
        self.c_attn = Conv1D(3 * c.n_embd, c.n_embd)
        self.c_proj = Conv1D(c.n_embd, c.n_embd)

    def forward(self, x, mask):
        q, k, v = self.c_attn(x).split(x.shape[-1], dim=-1)
        shape = (*x.shape[:-1], self.heads, -1)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        return self.c_proj(attend(q, k, v, mask, self.scale))


class GPT2MLP(nn.Module):
    def __init__(self, c: SimpleNamespace) -> None:
        super().__init__()
        self.c_fc = Conv1D(c.n_inner, c.n_embd)
        self.c_proj = Conv1D(c.n_embd, c.n_inner)

    def forward(self, x):
        return self.c_proj(gelu_new(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, c: SimpleNamespace, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.n_embd, eps=c.eps)
        self.attn = GPT2Attention(c, layer)
        self.ln_2 = nn.LayerNorm(c.n_embd, eps=c.eps)
        self.mlp = GPT2MLP(c)

    def forward(self, h, attention_mask=None, position_ids=None):
        h = h + self.attn(self.ln_1(h), attention_mask)
        return h + self.mlp(self.ln_2(h))


class NativeGPT2(_Skeleton):
    base_model_prefix = "transformer"

    def __init__(self, c: SimpleNamespace) -> None:
        super().__init__()
        self.config = c
        t = self.transformer = nn.Module()
        t.wte = nn.Embedding(c.vocab_size, c.n_embd)
        t.wpe = nn.Embedding(c.n_positions, c.n_embd)
        t.drop = nn.Dropout(0.0)  # eval only: dropout is the identity
        t.h = nn.ModuleList(GPT2Block(c, i) for i in range(c.n_layer))
        t.ln_f = nn.LayerNorm(c.n_embd, eps=c.eps)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        if c.tie_word_embeddings:
            self.lm_head.weight = t.wte.weight

    def get_input_embeddings(self) -> nn.Module:
        return self.transformer.wte
