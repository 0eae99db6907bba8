"""Canonical weights: what a fast kernel needs to recompute a model's forward by itself.

`read_weights(hf_model)` returns a `ModelWeights` — plain tensors (the model's own, shared,
never copied) and flags, one `LayerWeights` per block — so a kernel is a reader of this
description instead of a rewrite per architecture. The block it describes:

    h     = norm(x, norm1)                          # pre-attention norm
    q,k,v = h @ wq.T + bq, ...                      # grouped heads: query head h reads kv head h // (n_heads / n_kv)
    q,k   = norm(q, q_norm), norm(k, k_norm)        # per head, over d_head (Gemma-3; None elsewhere)
    q,k   = rotary(q, k; rope_inv_freq, rope_scaling)   # per layer (Gemma-3: local 10k / global 1M base)
    s     = q k^T * attn_scale   (tanh softcap if attn_softcap)   causal, within sliding_window if set
    a     = softmax(s) v @ wo.T + bo;   a = norm(a, attn_post_norm) if set   (= hook_attn_out)
    x     = x + a                                   # sequential residual (parallel: both read x)
    m     = mlp(norm(x, norm2));  m = norm(m, mlp_post_norm) if set           (= hook_mlp_out)
    x     = x + m

with norm(x, w) = x / sqrt(mean(x^2) + eps) * (w + norm_offset) computed in float32 (RMSNorm;
Gemma stores w - 1, so norm_offset = 1), mlp = w_out(act(w_gate h) * (w_in h)) when gated
(SwiGLU: silu; Gemma: gelu_tanh) else w_out(act(w_in h + b_in)) + b_out, the embedding
W_E[ids] * embed_scale (Gemma: sqrt(d_model), rounded to the weights' dtype) and the logits
norm(x, final_norm) @ W_U.T + b_U (tanh softcap if final_softcap).

Architectures read: Llama-style (llama, mistral, qwen2: RMSNorm, SwiGLU) and Gemma-3 text.
Others raise NotImplementedError, and callers take their reference paths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:   # annotations only: the architecture lists below are read without torch (local.py)
    import torch

LLAMA_LIKE = ("llama", "mistral", "qwen2")
GEMMA3 = ("gemma3_text", "gemma3")
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
               "gelu": "gelu"}


@dataclass(frozen=True)
class LayerWeights:
    norm1: torch.Tensor                 # [d_model] pre-attention norm scale, as stored
    wq: torch.Tensor                    # [n_heads*d_head d_model] (nn.Linear layout)
    wk: torch.Tensor                    # [n_kv*d_head d_model]
    wv: torch.Tensor                    # [n_kv*d_head d_model]
    wo: torch.Tensor                    # [d_model n_heads*d_head]
    bq: torch.Tensor | None
    bk: torch.Tensor | None
    bv: torch.Tensor | None
    bo: torch.Tensor | None
    q_norm: torch.Tensor | None         # [d_head] per-head query norm (Gemma-3)
    k_norm: torch.Tensor | None
    attn_post_norm: torch.Tensor | None  # [d_model] norm of the attention output (Gemma)
    norm2: torch.Tensor                 # [d_model] pre-MLP norm
    w_gate: torch.Tensor | None         # [d_mlp d_model] (gated MLPs)
    w_in: torch.Tensor                  # [d_mlp d_model]
    w_out: torch.Tensor                 # [d_model d_mlp]
    b_in: torch.Tensor | None
    b_out: torch.Tensor | None
    mlp_post_norm: torch.Tensor | None  # [d_model] norm of the MLP output (Gemma)
    rope_inv_freq: torch.Tensor         # [d_head/2] float32 rotary frequencies of this layer
    rope_scaling: float                 # cos/sin multiplier (1.0 for default rope)
    attn_scale: float                   # multiplies q.k (d_head**-0.5; Gemma: query_pre_attn_scalar**-0.5)
    sliding_window: int | None          # keys at q - kv < window only (Gemma-3 local layers)


@dataclass(frozen=True)
class ModelWeights:
    architecture: str                   # the Hugging Face model_type
    norm: str                           # "rms"
    norm_offset: float                  # 0.0, or 1.0 for Gemma's (1 + w)
    eps: float
    n_layers: int
    n_heads: int
    n_kv: int
    d_head: int
    d_model: int
    mlp: str                            # "gated" or "plain"
    act: str                            # "silu", "gelu_tanh" or "gelu"
    parallel: bool                      # attention and MLP both read the block input
    embed: torch.Tensor                 # W_E [d_vocab d_model]
    embed_scale: float                  # 1.0, or sqrt(d_model) for Gemma
    final_norm: torch.Tensor            # [d_model]
    W_U: torch.Tensor                   # [d_vocab d_model]
    b_U: torch.Tensor | None
    attn_softcap: float | None
    final_softcap: float | None
    layers: tuple[LayerWeights, ...]


def _bias(lin):
    return getattr(lin, "bias", None)


def _eps(norm) -> float:
    return float(getattr(norm, "variance_epsilon", None) or getattr(norm, "eps"))


def read_weights(hf) -> ModelWeights:
    """The canonical weights of a Hugging Face causal LM (the model's tensors, not copies)."""
    cfg = hf.config
    kind = cfg.model_type
    if kind not in LLAMA_LIKE + GEMMA3:
        raise NotImplementedError(f"no canonical weights for {kind!r}")
    gemma = kind in GEMMA3
    core = hf.model
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    act_name = getattr(cfg, "hidden_activation", None) or cfg.hidden_act
    if act_name not in ACTIVATIONS:
        raise NotImplementedError(f"no fast activation for {act_name!r}")
    rot = core.rotary_emb
    layer_types = getattr(cfg, "layer_types", None)

    def rope(i):
        if gemma:
            t = layer_types[i]
            return getattr(rot, f"{t}_inv_freq"), float(getattr(rot, f"{t}_attention_scaling"))
        return rot.inv_freq, float(rot.attention_scaling)

    layers = []
    for i, blk in enumerate(core.layers):
        a, m = blk.self_attn, blk.mlp
        inv_freq, rscale = rope(i)
        window = getattr(a, "sliding_window", None)
        if not gemma and window is not None:
            raise NotImplementedError("sliding-window Llama-style attention")
        layers.append(LayerWeights(
            norm1=blk.input_layernorm.weight,
            wq=a.q_proj.weight, wk=a.k_proj.weight, wv=a.v_proj.weight, wo=a.o_proj.weight,
            bq=_bias(a.q_proj), bk=_bias(a.k_proj), bv=_bias(a.v_proj), bo=_bias(a.o_proj),
            q_norm=a.q_norm.weight if gemma else None, k_norm=a.k_norm.weight if gemma else None,
            attn_post_norm=blk.post_attention_layernorm.weight if gemma else None,
            norm2=(blk.pre_feedforward_layernorm if gemma else blk.post_attention_layernorm).weight,
            w_gate=m.gate_proj.weight, w_in=m.up_proj.weight, w_out=m.down_proj.weight,
            b_in=_bias(m.up_proj), b_out=_bias(m.down_proj),
            mlp_post_norm=blk.post_feedforward_layernorm.weight if gemma else None,
            rope_inv_freq=inv_freq, rope_scaling=rscale, attn_scale=float(a.scaling),
            sliding_window=int(window) if window else None))
    if any(_bias(blk.mlp.gate_proj) is not None for blk in core.layers):
        raise NotImplementedError("gate projections with biases")
    emb = core.embed_tokens
    scale = getattr(emb, "embed_scale", None)
    return ModelWeights(
        architecture=kind, norm="rms", norm_offset=1.0 if gemma else 0.0,
        eps=_eps(core.layers[0].input_layernorm), n_layers=len(layers), n_heads=n_heads, n_kv=n_kv,
        d_head=d_head, d_model=cfg.hidden_size, mlp="gated", act=ACTIVATIONS[act_name], parallel=False,
        embed=emb.weight, embed_scale=float(scale.to(emb.weight.dtype)) if scale is not None else 1.0,
        final_norm=core.norm.weight, W_U=hf.lm_head.weight, b_U=_bias(hf.lm_head),
        attn_softcap=getattr(cfg, "attn_logit_softcapping", None),
        final_softcap=getattr(cfg, "final_logit_softcapping", None), layers=tuple(layers))
