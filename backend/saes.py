"""SAE registry and loading.

Three ways to name an SAE, tried in this order:
  1. a shipped id: a folder under data/saes/<id>/ (SAELens format: cfg.json +
     sae_weights.safetensors, plus our quality.json), e.g. "smollm2-135m-L15-resid_pre";
  2. a path to any SAELens-format folder on disk;
  3. "<release>/<sae_id>" of a SAELens pretrained release (e.g. "gpt2-small-res-jb/
     blocks.8.hook_resid_pre"), downloaded when a network is there.

SAEs load once per process as float32 (shipped weights are float16 on disk; the cast is
exact) and are shared read-only by every session.
"""

from __future__ import annotations

import json
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


def resolve(sae: str, root: Path | None = None) -> tuple[str, str]:
    """("folder", path) or ("release", "release/sae_id"); UnknownSAE otherwise."""
    if not isinstance(sae, str) or not sae.strip():
        raise UnknownSAE("No SAE given.")
    shipped = Path(root or SAE_DIR) / sae
    if "/" not in sae and (shipped / "cfg.json").exists():
        return "folder", str(shipped)
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
            else:
                from .model import _network_up

                if not _network_up():
                    raise SAEUnavailableOffline(f"SAE {sae!r} must be downloaded and this machine is "
                                                "offline; use a shipped SAE (python -m backend saes).")
                release, _, sae_id = ref.partition("/")
                obj = SAE.from_pretrained(release, sae_id, device=settings.device())
            _loaded[ref] = obj.eval()
        return _loaded[ref]


def sae_info(sae: str, root: Path | None = None) -> dict:
    """Description of an SAE without loading its weights when it is a folder."""
    kind, ref = resolve(sae, root)
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
