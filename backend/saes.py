"""SAE registry and loading.

Four ways to name an SAE, tried in this order:
  1. a shipped id: a folder under data/saes/<id>/ (SAELens format: cfg.json +
     sae_weights.safetensors, plus our quality.json), e.g. "smollm2-135m-L15-resid_pre";
  2. one layer of a transcoder set, "<set>.L<layer>" (e.g. "smollm2-135m-plt.L12"): the
     layer's transcoder as SAELens's JumpReLU(Skip)Transcoder, reading the MLP's input
     (metadata.hook_name = blocks.L.mlp.hook_in) and writing its output
     (metadata.hook_name_out = blocks.L.hook_mlp_out), so its features get the same index,
     scores and dashboards as SAE features; `write_hook(sae)` is where a feature's decoder row
     acts;
  3. a path to any SAELens-format folder on disk;
  4. "<release>/<sae_id>" of a SAELens pretrained release (e.g. "gpt2-small-res-jb/
     blocks.8.hook_resid_pre"), downloaded when a network is there.

SAEs load once per process as float32 (shipped weights are float16 on disk; the cast is
exact) and are shared read-only by every session.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Any

from . import settings
from .errors import SAEUnavailableOffline, UnknownSAE
from .model.local import same_weights

SAE_DIR = settings.DATA_DIR / "saes"

_loaded: dict[str, Any] = {}
_lock = threading.Lock()


def _folder_info(path: Path, source: str) -> dict:
    cfg = json.loads((path / "cfg.json").read_text())
    meta = cfg.get("metadata", {})
    q = json.loads((path / "quality.json").read_text()) if (path / "quality.json").exists() else None
    return {"sae_id": path.name if source == "shipped" else str(path), "source": source,
            "model": meta.get("model_name"), "hook_name": meta.get("hook_name"),
            "architecture": cfg.get("architecture"), "d_in": cfg.get("d_in"), "d_sae": cfg.get("d_sae"),
            "k": cfg.get("k"), "quality": q["quality"] if q else None,
            "training": q.get("training") if q else None, "path": str(path)}


def list_saes(model: str | None = None, root: Path | None = None) -> list[dict]:
    """Shipped SAEs (folders under data/saes with a cfg.json), optionally for one model."""
    root = Path(root or SAE_DIR)
    out = []
    for p in sorted(root.glob("*/cfg.json")):
        info = _folder_info(p.parent, "shipped")
        if model is None or info["model"] == model or (info["model"] and same_weights(info["model"], model)):
            out.append(info)
    return out


_TC_LAYER = re.compile(r"^(?P<set>[^/]+)\.L(?P<layer>\d+)$")


def transcoder_layer(sae: str) -> tuple[Path, int] | None:
    """(set folder, layer) of a transcoder layer id "<set>.L<layer>", None if it is not one."""
    m = _TC_LAYER.match(sae) if isinstance(sae, str) else None
    if not m:
        return None
    from . import transcoders

    try:
        folder = transcoders.resolve(m["set"])
    except transcoders.UnknownTranscoders:
        return None
    layer = int(m["layer"])
    if not (folder / f"layer_{layer}.safetensors").exists():
        raise UnknownSAE(f"The transcoder set {m['set']!r} has no layer {layer}.")
    return folder, layer


def transcoder_features(set_id: str) -> list[str]:
    """The SAE-like ids of every layer of a transcoder set ("<set>.L0", "<set>.L1", ...)."""
    from . import transcoders

    folder = transcoders.resolve(set_id)
    layers = sorted(int(f.stem.split("_")[1]) for f in folder.glob("layer_*.safetensors"))
    return [f"{folder.name}.L{layer}" for layer in layers]


def feature_sources(model: str) -> list[str]:
    """Every shipped source of features of a model: its SAEs, then every layer of its transcoder
    sets (the feature pages' selector)."""
    from . import transcoders

    ids = [s["sae_id"] for s in list_saes(model)]
    for t in transcoders.list_sets(model):
        ids += transcoder_features(t["id"])
    return ids


def write_hook(sae) -> str:
    """Where one unit of a latent's decoder row acts: the SAE's own hook, or a transcoder's
    output hook (the MLP's output)."""
    return getattr(sae.cfg.metadata, "hook_name_out", None) or sae.cfg.metadata.hook_name


def resolve(sae: str, root: Path | None = None) -> tuple[str, str]:
    """("folder", path), ("transcoder", "folder#layer") or ("release", "release/sae_id");
    UnknownSAE otherwise."""
    if not isinstance(sae, str) or not sae.strip():
        raise UnknownSAE("No SAE given.")
    shipped = Path(root or SAE_DIR) / sae
    if "/" not in sae and (shipped / "cfg.json").exists():
        return "folder", str(shipped)
    tc = transcoder_layer(sae) if "/" not in sae else None
    if tc is not None:
        return "transcoder", f"{tc[0]}#{tc[1]}"
    p = Path(sae).expanduser()
    if p.is_absolute() or sae.startswith("."):
        if (p / "cfg.json").exists():
            return "folder", str(p)
        raise UnknownSAE(f"{sae} is not a SAELens SAE folder (no cfg.json there).")
    if "/" in sae:
        release, _, sae_id = sae.partition("/")
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

        directory = get_pretrained_saes_directory()
        if release in directory and sae_id in directory[release].saes_map:
            return "release", sae
        raise UnknownSAE(f"{sae!r} is not a SAELens release/sae_id pair.")
    ids = ", ".join(s["sae_id"] for s in list_saes(root=root)) or "none"
    raise UnknownSAE(f"Unknown SAE {sae!r}. Shipped SAEs: {ids}. A SAELens folder path or "
                     "'<release>/<sae_id>' also works.")


def load_sae(sae: str, root: Path | None = None):
    """The SAELens SAE object (float32, eval mode, on the project's device), cached."""
    kind, ref = resolve(sae, root)
    from .model.loading import import_stack

    import_stack()
    with _lock:
        if ref not in _loaded:
            from sae_lens import SAE

            if kind == "folder":
                obj = SAE.load_from_disk(ref, device=settings.device(), dtype="float32")
            elif kind == "transcoder":
                obj = _load_transcoder_layer(ref)
            else:
                from .model import _network_up

                if not _network_up():
                    raise SAEUnavailableOffline(f"SAE {sae!r} must be downloaded and this machine is "
                                                "offline; use a shipped SAE (python -m backend saes).")
                release, _, sae_id = ref.partition("/")
                obj = SAE.from_pretrained(release, sae_id, device=settings.device())
            _loaded[ref] = obj.eval()
        return _loaded[ref]


def _load_transcoder_layer(ref: str):
    """One layer of a circuit-tracer transcoder folder as SAELens's JumpReLU(Skip)Transcoder
    (float32): W_enc transposed to SAELens's [d_in d_sae]; W_dec [d_sae d_out], b_dec, the
    thresholds and W_skip [d_out d_in] as they are."""
    import torch
    from safetensors.torch import load_file
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.transcoder import (JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig,
                                          JumpReLUTranscoder, JumpReLUTranscoderConfig)

    from . import transcoders

    folder, layer = ref.rsplit("#", 1)
    folder, layer = Path(folder), int(layer)
    t = {k: v.float() for k, v in load_file(str(folder / f"layer_{layer}.safetensors")).items()}
    cfgd = transcoders._read_config(folder)
    d_sae, d_in = t["W_enc"].shape
    skip = "W_skip" in t
    meta = SAEMetadata(model_name=cfgd.get("dashboard_model"), hook_name=f"blocks.{layer}.mlp.hook_in",
                       hook_name_out=f"blocks.{layer}.hook_mlp_out", transcoder_set=folder.name, layer=layer)
    Cfg, Cls = ((JumpReLUSkipTranscoderConfig, JumpReLUSkipTranscoder) if skip
                else (JumpReLUTranscoderConfig, JumpReLUTranscoder))
    obj = Cls(Cfg(d_in=d_in, d_sae=d_sae, d_out=t["W_dec"].shape[1], dtype="float32",
                  device=str(settings.device()), apply_b_dec_to_input=False, metadata=meta))
    with torch.no_grad():
        obj.W_enc.copy_(t["W_enc"].T)
        obj.b_enc.copy_(t["b_enc"])
        obj.W_dec.copy_(t["W_dec"])
        obj.b_dec.copy_(t["b_dec"])
        obj.threshold.copy_(t["activation_function.threshold"])
        if skip:
            obj.W_skip.copy_(t["W_skip"])
    return obj


def _transcoder_info(sae: str, ref: str) -> dict:
    from . import transcoders

    folder, layer = ref.rsplit("#", 1)
    d = transcoders.describe(Path(folder))
    q = next((r for r in (d.get("layers") or []) if r.get("layer") == int(layer)), None)
    return {"sae_id": sae, "source": "transcoder", "model": d["model"], "hook_name": f"blocks.{layer}.mlp.hook_in",
            "hook_out": f"blocks.{layer}.hook_mlp_out",
            "architecture": "jumprelu_skip_transcoder" if d.get("skip") else "jumprelu_transcoder",
            "d_in": None, "d_sae": d.get("d_transcoder"), "k": None, "quality": q, "training": None,
            "path": folder, "transcoder_set": d["id"], "layer": int(layer)}


def sae_info(sae: str, root: Path | None = None) -> dict:
    """Description of an SAE without loading its weights when it is a folder."""
    kind, ref = resolve(sae, root)
    if kind == "transcoder":
        return _transcoder_info(sae, ref)
    if kind == "folder":
        return _folder_info(Path(ref), "shipped" if Path(ref).parent == Path(root or SAE_DIR) else "folder")
    s = load_sae(sae, root)
    return {"sae_id": sae, "source": "release", "model": s.cfg.metadata.model_name,
            "hook_name": s.cfg.metadata.hook_name, "architecture": s.cfg.architecture(),
            "d_in": s.cfg.d_in, "d_sae": s.cfg.d_sae, "k": getattr(s.cfg, "k", None),
            "quality": None, "training": None, "path": None}


def add_cli_args(p) -> None:
    p.add_argument("--model", default=None, help="only SAEs of this model")


def run_cli(a) -> dict:
    return {"saes": list_saes(a.model)}
