"""Transcoder sets: registry, loading, and their quality.

A transcoder set is one per-layer transcoder for every MLP of a model, in circuit-tracer's
folder format so that circuit-tracer loads it unchanged (`TranscoderSet` from the folder, or by
name from $CIRCUIT_TRACER_CACHE_DIR/<id>/):

    data/transcoders/<id>/config.yaml          model_kind: transcoder_set, feature_input_hook:
                                               mlp.hook_in, feature_output_hook: mlp.hook_out, ...
    data/transcoders/<id>/layer_{i}.safetensors  W_enc [d_tc d_model], W_dec [d_tc d_model], b_enc,
                                               b_dec, W_skip [d_model d_model] (x @ W_skip.T),
                                               activation_function.threshold [d_tc] (JumpReLU)
    data/transcoders/<id>/quality.json         ours: per-layer FVU / L0 / dead, replacement fidelity
                                               (measured by backend/train_transcoders.py)

Feature i of layer L: a = JumpReLU_theta(W_enc[i] . x + b_enc[i]) with x the MLP's input (the
pre-MLP norm's output); the MLP's output is approximated by sum_i a_i W_dec[i] + b_dec + W_skip x.
A set is named by its folder name under data/transcoders or by a path to such a folder.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import settings
from .errors import DashboardError

if TYPE_CHECKING:     # torch only where a set is loaded: the pages resolve set names without it
    import torch

TRANSCODER_DIR = settings.DATA_DIR / "transcoders"
KEYS = {"W_enc", "W_dec", "b_enc", "b_dec", "W_skip", "activation_function.threshold"}
HUB_NAMES = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct", "gemma3-270m": "google/gemma-3-270m"}


class UnknownTranscoders(DashboardError):
    code = "unknown_transcoders"


class DamagedTranscoders(DashboardError):
    code = "damaged_transcoders"


def default_set_id(model: str) -> str:
    return f"{model}-plt"


def write_config(folder: Path, model: str, n_layers: int, extra: dict | None = None) -> None:
    """config.yaml as circuit-tracer reads it (keys it does not know are kept, not used)."""
    import yaml

    cfg = {"model_kind": "transcoder_set", "model_name": HUB_NAMES.get(model, model),
           "feature_input_hook": "mlp.hook_in", "feature_output_hook": "mlp.hook_out",
           "scan": f"{model}/{folder.name.split('.tmp')[0]}", "dashboard_model": model, "n_layers": n_layers,
           **(extra or {})}
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def _read_config(folder: Path) -> dict:
    import yaml

    try:
        cfg = yaml.safe_load((folder / "config.yaml").read_text())
    except (OSError, yaml.YAMLError) as e:
        raise DamagedTranscoders(f"{folder}: config.yaml unreadable ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("model_kind") != "transcoder_set":
        raise DamagedTranscoders(f"{folder}: config.yaml is not a transcoder_set")
    return cfg


def resolve(name: str, root: Path | None = None) -> Path:
    if not isinstance(name, str) or not name.strip():
        raise UnknownTranscoders("No transcoder set given.")
    p = Path(root or TRANSCODER_DIR) / name
    if "/" not in name and (p / "config.yaml").exists():
        return p
    q = Path(name).expanduser()
    if q.is_dir() and (q / "config.yaml").exists():
        return q
    raise UnknownTranscoders(f"No transcoder set {name!r}; shipped: "
                             f"{', '.join(s['id'] for s in list_sets(root=root)) or 'none'}.")


def list_sets(model: str | None = None, root: Path | None = None) -> list[dict]:
    """Every shipped set (folders under data/transcoders with a config.yaml): id, model, path,
    d_transcoder, activation, n_layers and per-layer quality (fvu, l0, dead_pct) when measured."""
    root = Path(root or TRANSCODER_DIR)
    out = []
    for c in sorted(root.glob("*/config.yaml")):
        if ".tmp" in c.parent.name or c.parent.name.endswith(".old"):
            continue
        try:
            out.append(describe(c.parent))
        except DashboardError:
            continue
        if model is not None and out[-1]["model"] != model:
            out.pop()
    return out


def describe(folder: Path) -> dict:
    cfg = _read_config(folder)
    q = json.loads((folder / "quality.json").read_text()) if (folder / "quality.json").exists() else {}
    files = sorted(folder.glob("layer_*.safetensors"), key=lambda f: int(f.stem.split("_")[1]))
    return {"id": folder.name, "model": cfg.get("dashboard_model", cfg.get("model_name")), "path": str(folder),
            "format": "circuit-tracer transcoder_set", "d_transcoder": cfg.get("d_transcoder"),
            "activation": "jumprelu", "skip": cfg.get("skip"), "n_layers": len(files),
            "training_tokens": cfg.get("training_tokens"),
            "layers": q.get("layers", [{"layer": int(f.stem.split("_")[1])} for f in files]),
            "fidelity": q.get("fidelity")}


def fingerprint(folder: Path) -> str:
    """12 hex digits that change whenever the set's weights do: the sha256 of every layer file
    written into config.yaml by the trainer (`weights_sha256`), else one computed from the
    config and the layer files' names and sizes. Never mtimes: a clone must give the same."""
    import hashlib

    folder = Path(folder)
    cfg = _read_config(folder)
    if cfg.get("weights_sha256"):
        return str(cfg["weights_sha256"])[:12]
    h = hashlib.sha256((folder / "config.yaml").read_bytes())
    for f in sorted(folder.glob("layer_*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:12]


def weights_sha256(folder: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for f in sorted(Path(folder).glob("layer_*.safetensors"), key=lambda f: int(f.stem.split("_")[1])):
        h.update(f.read_bytes())
    return h.hexdigest()


def stamp(folder: Path) -> str:
    """Record the weights' sha256 in config.yaml (after every write of the layer files)."""
    import yaml

    folder = Path(folder)
    cfg = _read_config(folder)
    cfg["weights_sha256"] = weights_sha256(folder)
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return cfg["weights_sha256"]


def reference(name: str, model: str, root: Path | None = None) -> str:
    """What a spec records: "<set>@<fingerprint>" ("" names the model's shipped set), so a
    result computed with one set of weights is never read back for another."""
    if "@" in name:
        return name
    folder = resolve(name or default_set_id(model), root)
    return f"{name or folder.name}@{fingerprint(folder)}"


def load_reference(ref: str, n_layers: int | None = None, d_model: int | None = None, root: Path | None = None):
    """load_set of a reference, refusing a set whose weights changed since it was recorded."""
    name, _, fp = ref.partition("@")
    folder = resolve(name, root)
    if fp and fingerprint(folder) != fp:
        raise UnknownTranscoders(f"The transcoder set {name!r} changed since this result was made "
                                 f"(fingerprint {fp}, now {fingerprint(folder)}); trace the prompt again.")
    return load_set(name, n_layers, d_model, root)


def models_with_sets(root: Path | None = None) -> list[str]:
    return sorted({s["model"] for s in list_sets(root=root)})


@dataclass
class LoadedSet:
    """A set in float32 on the device: per layer W_enc [d_tc d], b_enc, W_dec [d_tc d], b_dec,
    W_skip [d d] or None, threshold [d_tc]."""
    id: str
    model: str
    path: Path
    W_enc: list[torch.Tensor]
    b_enc: list[torch.Tensor]
    W_dec: list[torch.Tensor]
    b_dec: list[torch.Tensor]
    W_skip: list[torch.Tensor | None]
    threshold: list[torch.Tensor]

    @property
    def n_layers(self) -> int:
        return len(self.W_enc)

    @property
    def d_transcoder(self) -> int:
        return self.W_enc[0].shape[0]

    def pre(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return x @ self.W_enc[layer].t() + self.b_enc[layer]

    def encode(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """JumpReLU activations [... d_tc] of the MLP input x [... d_model]."""
        p = self.pre(layer, x)
        return p * (p > self.threshold[layer])

    def decode(self, layer: int, acts: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out = acts @ self.W_dec[layer] + self.b_dec[layer]
        if self.W_skip[layer] is not None:
            out = out + x @ self.W_skip[layer].t()
        return out

    def forward(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self.decode(layer, self.encode(layer, x), x)


_loaded: dict[tuple[str, str], LoadedSet] = {}
_lock = threading.Lock()


def forget(folder: Path) -> None:
    """Drop a set from the per-process cache (its files are about to change)."""
    with _lock:
        for k in [k for k in _loaded if k[0] == str(Path(folder).resolve())]:
            _loaded.pop(k)


def load_set(name: str, n_layers: int | None = None, d_model: int | None = None, root: Path | None = None) -> LoadedSet:
    """The set named `name` (shipped id or folder), once per process; DamagedTranscoders when a
    layer is missing (0..n-1 must all be there, n = n_layers if given), a key unknown to
    circuit-tracer is present, or shapes disagree."""
    import torch
    from safetensors.torch import load_file

    folder = resolve(name, root)
    dev = settings.device()
    key = (str(folder.resolve()), dev)
    with _lock:
        if key in _loaded:
            return _loaded[key]
        cfg = _read_config(folder)
        files = {int(f.stem.split("_")[1]): f for f in folder.glob("layer_*.safetensors")}
        want = n_layers or cfg.get("n_layers") or (max(files) + 1 if files else 0)
        missing = [i for i in range(want) if i not in files]
        if not files or missing:
            raise DamagedTranscoders(f"{folder}: missing layer file(s) {missing or 'all'} (layer_<i>.safetensors)")
        parts: dict[str, list] = {k: [] for k in ("W_enc", "b_enc", "W_dec", "b_dec", "W_skip", "threshold")}
        for i in range(want):
            try:
                t = load_file(str(files[i]))
            except Exception as e:   # a truncated or foreign file: safetensors raises its own errors
                raise DamagedTranscoders(f"{files[i].name}: unreadable ({e})") from None
            extra = set(t) - KEYS
            if extra or not {"W_enc", "W_dec", "b_enc", "b_dec"} <= set(t):
                raise DamagedTranscoders(f"{files[i].name}: keys {sorted(t)} (expected {sorted(KEYS)})")
            d_tc, d = t["W_enc"].shape
            dm = d_model or d
            ok = (t["W_enc"].shape == (d_tc, dm) and t["W_dec"].shape == (d_tc, dm) and t["b_enc"].shape == (d_tc,)
                  and t["b_dec"].shape == (dm,) and ("W_skip" not in t or t["W_skip"].shape == (dm, dm))
                  and t.get("activation_function.threshold", torch.zeros(d_tc)).shape == (d_tc,))
            if not ok:
                raise DamagedTranscoders(f"{files[i].name}: shapes " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in t.items())
                                         + f" do not fit d_model {dm}")
            f32 = {k: v.to(dev, torch.float32) for k, v in t.items()}
            for k in ("W_enc", "b_enc", "W_dec", "b_dec"):
                parts[k].append(f32[k])
            parts["W_skip"].append(f32.get("W_skip"))
            parts["threshold"].append(f32.get("activation_function.threshold", torch.zeros(d_tc, device=dev)))
        if len({w.shape[0] for w in parts["W_enc"]}) != 1:
            raise DamagedTranscoders(f"{folder}: layers differ in width")
        s = LoadedSet(folder.name, cfg.get("dashboard_model", cfg.get("model_name")), folder, **parts)
        _loaded[key] = s
        return s


# -- CLI ----------------------------------------------------------------------------------
def add_cli_args(p) -> None:
    p.add_argument("--model", default=None, help="only the sets of this model")


def run_cli(a) -> dict:
    return {"transcoders": list_sets(a.model)}
