"""Neurons: the hidden units of the MLPs, per prompt and through the unembedding.

A neuron of block L is one coordinate of blocks.L.mlp.hook_post, the input of the MLP's
output matrix. SmolLM2 (Llama-style) has a gated SiLU MLP:
    post = silu(x @ W_gate) * (x @ W_in)          [pos d_mlp]
    mlp_out = post @ W_out                         [pos d_model]
so a neuron has no hard zero: it can be negative (silu dips to −0.28, and the linear "up"
factor has either sign). Top neurons are therefore given both by value (most positive)
and by |value|.

NeuronsSpec → NeuronsResult: one prompt, one layer; the forward stops at that layer's hook.
    top_ids/top_values [pos k]          the k neurons of largest value at each token
    top_abs_ids/top_abs_values [pos k]  the k neurons of largest |value| (value signed)
    neuron_max [d_mlp]                  each neuron's max value over the prompt
    neuron_absmax [d_mlp]               each neuron's max |value| over the prompt
    prompt_top_ids [n]                  the n neurons of largest neuron_max, best first
    prompt_top_acts [pos n]             their values at every token (colours a prompt)

NeuronLogitSpec → NeuronLogitResult: the direct logit effect of one neuron, the tokens its
output direction promotes and suppresses when read straight through the unembedding:
    effect = (W_out[L][n] ⊙ γ_final) @ W_U        [d_vocab]
γ_final is the final RMSNorm's weight, folded in as a diagonal: the norm multiplies every
residual coordinate by γ before the unembedding, so leaving it out would rank tokens by a
direction the model never reads. The norm's 1/RMS(resid) factor is not included: it depends
on the whole residual at a given token, is positive, and so scales every token's effect by
the same amount without changing the ranking. The values are "logits per unit activation,
before the 1/RMS factor". The unembedding has no bias in SmolLM2 (a bias, if present, does
not depend on the neuron and is left out).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InvalidSite, InvalidSpec
from ..model import LoadedModel
from ..runner import analysis
from ..sites import Component, Site, hook_name
from ..spec import Result, Spec, check_text

PROMPT_TOP = 32   # neurons kept with their value at every token (the prompt's most active)


def _check_int(name: str, v, lo: int, hi: int | None = None) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
        bound = f"{lo}–{hi}" if hi is not None else f"≥ {lo}"
        raise InvalidSpec(f"{name} must be an integer {bound}, got {v!r}.")


def neuron_site(model: LoadedModel, layer: int) -> str:
    """The hook name of the neurons of `layer`; InvalidSite if the layer does not exist."""
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise InvalidSite(f"Layer must be an integer, got {layer!r}.")
    site = Site(Component.MLP_POST, layer).check(model.info.n_layers, model.info.n_heads)
    return hook_name(site)


def check_neuron(model: LoadedModel, neuron: int) -> None:
    d = model.info.d_mlp
    if not isinstance(neuron, int) or isinstance(neuron, bool) or not 0 <= neuron < d:
        raise InvalidSite(f"Neuron {neuron!r} does not exist: the MLPs have neurons 0–{d - 1}.")


@dataclass(frozen=True)
class NeuronsSpec(Spec):
    KIND = "neurons"
    text: str = ""
    layer: int = 0
    k: int = 10

    def validate(self):
        check_text(self.text)
        if not isinstance(self.layer, int) or isinstance(self.layer, bool) or self.layer < 0:
            raise InvalidSite(f"Layer must be an integer ≥ 0, got {self.layer!r}.")
        _check_int("k", self.k, 1, 100)


@dataclass(frozen=True)
class NeuronsResult(Result):
    tokens: list[str]              # [pos]
    token_ids: list[int]           # [pos]
    layer: int
    hook_name: str
    d_mlp: int
    top_ids: np.ndarray            # [pos k] int, by value, highest first
    top_values: np.ndarray         # [pos k]
    top_abs_ids: np.ndarray        # [pos k] int, by |value|, largest first
    top_abs_values: np.ndarray     # [pos k] signed
    neuron_max: np.ndarray         # [d_mlp] max value over the prompt
    neuron_absmax: np.ndarray      # [d_mlp] max |value| over the prompt
    prompt_top_ids: np.ndarray     # [n] int, neurons of largest neuron_max
    prompt_top_acts: np.ndarray    # [pos n]

    def top_neurons(self, by_abs: bool = False) -> list[list[dict]]:
        """Per token, [{neuron, value}] best first."""
        ids, vals = (self.top_abs_ids, self.top_abs_values) if by_abs else (self.top_ids, self.top_values)
        return [[{"neuron": int(i), "value": float(v)} for i, v in zip(ri, rv)]
                for ri, rv in zip(ids, vals)]


def neuron_activations(model: LoadedModel, ids: list[int], layer: int):
    """The neurons of `layer` at every token, [pos d_mlp] float32; the forward stops there."""
    name = neuron_site(model, layer)
    try:
        return model.capture(ids, [name])[name][0].float()
    except RuntimeError:
        raise InvalidSite(f"The hook {name!r} did not fire in {model.info.model_id}.") from None


@analysis(NeuronsSpec, NeuronsResult)
def compute(spec: NeuronsSpec, model: LoadedModel, progress=None) -> NeuronsResult:
    import torch

    name = neuron_site(model, spec.layer)
    ids = model.encode(spec.text)
    acts = neuron_activations(model, ids, spec.layer)            # [pos d_mlp]
    k = min(spec.k, acts.shape[1])
    top = acts.topk(k, dim=-1)                                   # [pos k]
    top_abs = acts.abs().topk(k, dim=-1)
    abs_values = acts.gather(1, top_abs.indices)                 # signed
    nmax = acts.max(0).values                                    # [d_mlp]
    nabs = acts.abs().max(0).values
    n = min(PROMPT_TOP, acts.shape[1])
    best = nmax.topk(n).indices                                  # [n]
    with torch.inference_mode():
        return NeuronsResult(
            tokens=model.str_tokens(ids), token_ids=ids, layer=spec.layer, hook_name=name,
            d_mlp=int(acts.shape[1]),
            top_ids=top.indices.numpy().astype(np.int64), top_values=top.values.numpy(),
            top_abs_ids=top_abs.indices.numpy().astype(np.int64), top_abs_values=abs_values.numpy(),
            neuron_max=nmax.numpy(), neuron_absmax=nabs.numpy(),
            prompt_top_ids=best.numpy().astype(np.int64), prompt_top_acts=acts[:, best].numpy())


# ----------------------------------------------------------------------------------------
# Direct logit effect


@dataclass(frozen=True)
class NeuronLogitSpec(Spec):
    KIND = "neuron_logit"
    layer: int = 0
    neuron: int = 0
    k: int = 20

    def validate(self):
        for name in ("layer", "neuron"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise InvalidSite(f"{name.capitalize()} must be an integer ≥ 0, got {v!r}.")
        _check_int("k", self.k, 1, 200)


@dataclass(frozen=True)
class NeuronLogitResult(Result):
    layer: int
    neuron: int
    convention: str                # how the effect was computed
    promoted_ids: np.ndarray       # [k] int, largest effect first
    promoted_values: np.ndarray    # [k]
    promoted_tokens: list[str]     # [k]
    suppressed_ids: np.ndarray     # [k] int, most negative first
    suppressed_values: np.ndarray  # [k]
    suppressed_tokens: list[str]   # [k]
    out_norm: float                # |W_out[layer][neuron]|
    effect_mean: float             # mean and std of the effect over the vocabulary
    effect_std: float

    def as_lists(self) -> dict:
        def rows(ids, vals, toks):
            return [{"token_id": int(i), "token": t, "value": float(v)} for i, v, t in zip(ids, vals, toks)]
        return {"promoted": rows(self.promoted_ids, self.promoted_values, self.promoted_tokens),
                "suppressed": rows(self.suppressed_ids, self.suppressed_values, self.suppressed_tokens)}


CONVENTION = "(W_out[layer][neuron] * final_norm.weight) @ W_U; no 1/RMS factor, no bias"


def neuron_output_direction(model: LoadedModel, layer: int, neuron: int):
    """W_out[layer][neuron], [d_model]: what one unit of the neuron adds to the residual."""
    neuron_site(model, layer)
    check_neuron(model, neuron)
    w = model.mlp_out_weight(layer)                    # nn.Linear layout: [d_model d_mlp]
    return w[:, neuron].detach().float()


def logit_effect(model: LoadedModel, layer: int, neuron: int):
    """The neuron's direct logit effect over the vocabulary, [d_vocab] (see module docstring)."""
    import torch

    with model.lock, torch.inference_mode():
        d = neuron_output_direction(model, layer, neuron)                 # [d_model]
        gamma = model.final_norm_scale().float()                          # [d_model]
        w_u = model.unembed_weights()[0].float()                          # [d_vocab d_model]
        return w_u @ (d * gamma)                                          # [d_vocab]


@analysis(NeuronLogitSpec, NeuronLogitResult)
def compute_logit(spec: NeuronLogitSpec, model: LoadedModel, progress=None) -> NeuronLogitResult:
    eff = logit_effect(model, spec.layer, spec.neuron)
    k = min(spec.k, eff.shape[0])
    up = eff.topk(k)
    down = (-eff).topk(k)
    d = neuron_output_direction(model, spec.layer, spec.neuron)
    return NeuronLogitResult(
        layer=spec.layer, neuron=spec.neuron, convention=CONVENTION,
        promoted_ids=up.indices.numpy().astype(np.int64), promoted_values=up.values.numpy(),
        promoted_tokens=model.str_tokens(up.indices.tolist()),
        suppressed_ids=down.indices.numpy().astype(np.int64), suppressed_values=(-down.values).numpy(),
        suppressed_tokens=model.str_tokens(down.indices.tolist()),
        out_norm=float(d.norm()), effect_mean=float(eff.mean()), effect_std=float(eff.std()))


# ----------------------------------------------------------------------------------------
# Command line: python -m backend neurons


def add_cli_args(p) -> None:
    from ..model import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--text", required=True)
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--k", "--top-k", type=int, default=10, dest="k")
    p.add_argument("--neuron", type=int, default=None, help="also print this neuron's logit effect")
    p.add_argument("--logit-k", type=int, default=20)


def run_cli(a) -> dict:
    from ..runner import run

    out = run(NeuronsSpec(model=a.model, text=a.text, layer=a.layer, k=a.k))
    r = out.result
    payload = {"run_key": out.run_key, "from_store": out.from_store,
               "compute_seconds": round(out.compute_seconds, 4), "read_seconds": round(out.read_seconds, 4),
               "model": a.model, "text": a.text, "tokens": r.tokens, "token_ids": r.token_ids,
               "layer": r.layer, "hook_name": r.hook_name, "top_neurons": r.top_neurons(),
               "top_neurons_abs": r.top_neurons(by_abs=True),
               "prompt_top_neurons": [{"neuron": int(i), "max": float(r.neuron_max[i])}
                                      for i in r.prompt_top_ids]}
    if a.neuron is not None:
        lo = run(NeuronLogitSpec(model=a.model, layer=a.layer, neuron=a.neuron, k=a.logit_k))
        payload["logit_effect"] = {"run_key": lo.run_key, "neuron": a.neuron,
                                   "convention": lo.result.convention,
                                   "compute_seconds": round(lo.compute_seconds, 4),
                                   **lo.result.as_lists()}
    return payload
