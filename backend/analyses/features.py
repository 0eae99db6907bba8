"""SAE features of a prompt: at each token the most active latents, and how well the SAE
reconstructs the activation there.

The activation at the SAE's hook (hook_z flattened over heads) is encoded with the fused
TopK kernel (kernels/sae_encode.py, equal to SAELens's encode); the reconstruction is
decoded from the sparse code. Position 0 of a model without BOS carries the massive
activations (norm ~10^4 in the middle layers); our SAEs were trained without it, so its
error is reported but expected to be large.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InvalidSpec, SAEMismatch
from ..model import LoadedModel, trained_for
from ..runner import analysis
from ..spec import Result, Spec, check_text


@dataclass(frozen=True)
class FeaturesSpec(Spec):
    KIND = "features"
    sae: str = ""
    text: str = ""
    k: int = 10

    def validate(self):
        check_text(self.text)
        if not isinstance(self.sae, str) or not self.sae.strip():
            raise InvalidSpec("An SAE id is required (python -m backend saes lists them).")
        if not 1 <= self.k <= 100:
            raise InvalidSpec("k must be in 1–100.")


@dataclass(frozen=True)
class FeaturesResult(Result):
    tokens: list[str]            # [pos]
    token_ids: list[int]         # [pos]
    sae_id: str
    hook_name: str
    d_sae: int
    feature_ids: np.ndarray      # [pos k] int, most active first
    feature_values: np.ndarray   # [pos k] activation values (0 where fewer than k are active)
    l0: np.ndarray               # [pos] number of active latents
    act_norm: np.ndarray         # [pos] ||x||
    recon_error: np.ndarray      # [pos] ||x - x_hat||^2 / ||x||^2 (fraction of the squared norm)

    def top_features(self) -> list[list[dict]]:
        """Per token: [{"feature", "value"}] of the active latents, highest value first."""
        return [[{"feature": int(f), "value": float(v)} for f, v in zip(fs, vs) if v > 0]
                for fs, vs in zip(self.feature_ids.tolist(), self.feature_values.tolist())]


def hook_activations(model: LoadedModel, hook: str, ids: list[int]):
    """The activation [pos d] at one hook (heads flattened); the forward stops right there."""
    from ..errors import InvalidSite

    try:
        x = model.capture(ids, [hook])[hook][0]
    except (InvalidSite, RuntimeError):
        raise SAEMismatch(f"The hook {hook!r} of this SAE does not exist in {model.info.model_id}.") from None
    return x.flatten(1) if x.ndim == 3 else x


@analysis(FeaturesSpec, FeaturesResult)
def compute(spec: FeaturesSpec, model: LoadedModel, progress=None) -> FeaturesResult:
    import torch

    from kernels.sae_encode import fused_encode, sparse_decode

    from ..saes import load_sae

    sae = load_sae(spec.sae)
    hook = sae.cfg.metadata.hook_name
    trained_on = sae.cfg.metadata.model_name
    if trained_on and not trained_for(trained_on, model.info):
        raise SAEMismatch(f"SAE {spec.sae!r} was trained on {trained_on!r}, not {spec.model!r}.")
    ids = model.encode(spec.text)
    x = hook_activations(model, hook, ids).float()                 # [pos d_in]
    if x.shape[-1] != sae.cfg.d_in:
        raise SAEMismatch(f"SAE {spec.sae!r} expects width {sae.cfg.d_in} at {hook}, "
                          f"the model gives {x.shape[-1]}.")
    values, indices = fused_encode(sae, x, k=max(spec.k, 64))     # [pos k_sae] (TopK: its k)
    with torch.inference_mode():
        rec = sparse_decode(sae, values, indices)
        err = ((x - rec) ** 2).sum(-1) / (x ** 2).sum(-1).clamp_min(1e-12)
    if values.shape[1] < spec.k:   # fewer latents than asked: pad with feature -1, value 0
        pad = spec.k - values.shape[1]
        values = torch.cat([values, values.new_zeros(len(values), pad)], 1)
        indices = torch.cat([indices, indices.new_full((len(indices), pad), -1)], 1)
    return FeaturesResult(
        tokens=model.str_tokens(ids), token_ids=ids, sae_id=spec.sae, hook_name=hook,
        d_sae=int(sae.cfg.d_sae),
        feature_ids=indices[:, :spec.k].cpu().numpy().astype(np.int64),
        feature_values=values[:, :spec.k].float().cpu().numpy(),
        l0=(values > 0).sum(-1).cpu().numpy().astype(np.int64),
        act_norm=x.norm(dim=-1).cpu().numpy(), recon_error=err.cpu().numpy())


def add_cli_args(p) -> None:
    from ..model import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--sae", required=True, help="SAE id (python -m backend saes), folder or release/id")
    p.add_argument("--text", required=True)
    p.add_argument("--k", type=int, default=10)


def run_cli(a) -> dict:
    import sys

    from ..runner import run

    out = run(FeaturesSpec(model=a.model, sae=a.sae, text=a.text, k=a.k),
              progress=lambda m: print(m, file=sys.stderr))
    r = out.result
    return {"run_key": out.run_key, "from_store": out.from_store,
            "compute_seconds": round(out.compute_seconds, 4), "read_seconds": round(out.read_seconds, 4),
            "model": a.model, "sae": r.sae_id, "hook_name": r.hook_name, "d_sae": r.d_sae,
            "tokens": r.tokens, "token_ids": r.token_ids, "top_features": r.top_features(),
            "l0": r.l0.tolist(), "recon_error": [round(float(e), 6) for e in r.recon_error]}
