"""Local checkpoints: any Hugging Face folder on disk is a model.

A folder with `config.json`, weights (`*.safetensors`, or PyTorch `pytorch_model*.bin`) and its
tokenizer files (with its chat template) loads offline through the same TransformerBridge path
as the packaged models (loading.py `_load_local`). No name to register first: `--model PATH`
and a path typed in the sidebar's model box open it.

What counts as a path: a string that starts with `/`, `./`, `../` or `~`, or that contains a `/`
and names an existing folder (so a folder `org/name` in the working directory wins over the hub
repo of that name, as in transformers). A bare name (`my-ft`) stays a hub / TransformerLens name:
type `./my-ft`.

The model id: `<resolved absolute path>#<fingerprint>`
------------------------------------------------------
Chosen over "the path is the id" because results are keyed by the Spec, whose `model` is the id:
with the path alone, a checkpoint saved over an older one at the same path (the usual fine-tuning
loop) would silently be answered with the older checkpoint's stored results. With the fingerprint
in the id, the same question about the new weights has another key. So:

- the user types the path; `canonical_id` (called by every Spec, corpus job and `load_model`) spells
  it `/abs/path#1a2b3c4d5e6f`. A copied link carries that id, and opens its stored results even
  after the folder changed or moved away;
- an id with a fingerprint is accepted back as is; computing a missing result with it checks the
  folder first and refuses with CheckpointChanged when the folder now holds other weights (open
  the path again to analyse them: they get their own id);
- ModelInfo.model_id is the id, ModelInfo.hf_name the folder, ModelInfo.source "local".

The fingerprint (12 hex digits of a SHA-256) covers the files a load reads (config, weights and
their index, tokenizer and chat-template files; not README, trainer state or optimizer files):
each file's name, its size, its whole content when it is at most 1 MiB (config.json, the
tokenizer config and chat template) and, for larger files (weights, tokenizer.json), the first
64 KiB (a safetensors header: every tensor's name, dtype, shape and offset) plus 64 blocks of
4 KiB spread evenly over the file.

- Not a hash of whole files: hashing hundreds of MB to GB on every load (and the app builds specs
  on every rerun) is too slow; the sampled read is ~0.5 MB per file, milliseconds.
- Not names and sizes alone: a fine-tune saved over its base keeps every tensor shape, so every
  file size, and often config.json byte for byte. Every weight changes under fine-tuning, so any
  sampled block tells them apart; an edit confined to a few tensors (a merged LoRA on two
  projections, ~10 % of the bytes) escapes all 64 samples with probability ~0.9^64 ≈ 0.1 %.
- Not mtimes: they change on every copy (`cp`, rsync, a fresh download) of identical weights,
  which must keep one id and so their stored results.
The fingerprint is cached per process by (path, size, mtime, inode) of each file, so a folder is
re-read only when something in it changed.

Same weights, other id. An SAE records the model it was trained on (`smollm2-135m` for the
shipped ones). `same_weights` accepts it for a local folder whose fingerprint equals that of the
offline model's converted checkpoint (converted_dir): the converted SmolLM2 folder opened by path
reads the shipped SAEs, a fine-tune of it does not.

Registered folders (listed by `models --format json` and in the sidebar's model box): the folders
in DASHBOARD_MODELS (os.pathsep-separated; for a deployment) and those added with
`python -m backend models add PATH` (kept one a line in `<store>.models.txt`, beside the store;
`models remove PATH` forgets one). Nothing here imports torch (the app uses it).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
from pathlib import Path

from .. import settings
from ..errors import CheckpointChanged, InvalidCheckpoint, UnknownModel

FP_LEN = 12
_CANON = re.compile(r"^(/.*)#([0-9a-f]{%d})$" % FP_LEN)
_HEAD, _BLOCK, _SAMPLES, _SMALL = 64 * 1024, 4096, 64, 1024 * 1024

WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")
READ_FILES = WEIGHT_FILES + ("*.index.json", "config.json", "generation_config.json", "tokenizer*",
                             "special_tokens_map.json", "added_tokens.json", "chat_template*", "vocab.*",
                             "merges.txt", "*.tiktoken", "spiece.model", "preprocessor_config.json")

_fp_cache: dict[tuple, str] = {}


def looks_local(name) -> bool:
    """Whether a model id names a local folder (see the module docstring), by its spelling."""
    if not isinstance(name, str) or not name.strip():
        return False
    if name.startswith(("/", "./", "../", "~")) or name in (".", ".."):
        return True
    return "/" in name and os.path.isdir(name)


def split_id(name: str) -> tuple[str, str | None]:
    """(path, fingerprint or None) of a local model id."""
    m = _CANON.match(name)
    if m and not os.path.isdir(name):     # a folder literally named "x#<12 hex>" stays a path
        return m.group(1), m.group(2)
    return name, None


def _resolve(path: str) -> Path:
    return Path(path).expanduser().resolve()


def _files(folder: Path) -> list[os.DirEntry]:
    with os.scandir(folder) as it:
        return sorted((e for e in it if e.is_file() and any(fnmatch.fnmatch(e.name, pat) for pat in READ_FILES)),
                      key=lambda e: e.name)


def weight_files(folder: Path) -> list[str]:
    """The model's weight files (a PEFT adapter's adapter_model.* is not a model)."""
    return [e.name for e in _files(folder) if any(fnmatch.fnmatch(e.name, pat) for pat in WEIGHT_FILES)
            and not e.name.startswith("adapter_model")]


def _adapter_hint(folder: Path) -> str:
    if (folder / "adapter_config.json").exists() or any(folder.glob("adapter_model.*")):
        return (" It holds a PEFT adapter, not a model: merge it into its base model "
                "(model.merge_and_unload()) and save the merged model with save_pretrained.")
    return ""


def fingerprint(folder: Path) -> str:
    """The folder's fingerprint (module docstring): names, sizes, small files whole, large
    files sampled. Cached by the files' (size, mtime, inode)."""
    entries = _files(folder)
    stats = [(e.name, e.stat()) for e in entries]
    key = (str(folder), tuple((n, s.st_size, s.st_mtime_ns, s.st_ino) for n, s in stats))
    if key in _fp_cache:
        return _fp_cache[key]
    h = hashlib.sha256()
    for name, st in stats:
        size = st.st_size
        h.update(f"{name}\0{size}\0".encode())
        with open(folder / name, "rb") as fh:
            if size <= _SMALL:
                h.update(fh.read())
                continue
            h.update(fh.read(_HEAD))
            step = (size - _BLOCK) / (_SAMPLES - 1)
            for i in range(_SAMPLES):
                fh.seek(int(i * step))
                h.update(fh.read(_BLOCK))
    fp = h.hexdigest()[:FP_LEN]
    if len(_fp_cache) > 256:
        _fp_cache.clear()
    _fp_cache[key] = fp
    return fp


def canonical_id(name):
    """The id results are stored under: `/abs/path#fingerprint` for a path to a folder; any other
    id unchanged. Never raises (a path that is no folder stays as typed; loading it says what is
    wrong), never imports torch; an id that already carries a fingerprint is kept as it is."""
    if not looks_local(name):
        return name
    path, fp = split_id(name)
    if fp is not None:
        return name
    try:
        p = _resolve(path)
        return f"{p}#{fingerprint(p)}" if p.is_dir() else name
    except OSError:
        return name


def _shown(name: str) -> str:
    return name if len(name) <= 120 else name[:117] + "..."


def _hint() -> str:
    from .registry import _offline_hint

    return ("A local model is a Hugging Face checkpoint folder: config.json, weights (*.safetensors or "
            f"pytorch_model*.bin) and tokenizer files. {_offline_hint()}.")


def check_folder(name: str) -> str:
    """The canonical id of a local checkpoint folder, after the checks that need no torch: the folder
    exists (UnknownModel), is a folder with a readable config.json naming a model_type and weight
    files (InvalidCheckpoint), and, when the id carries a fingerprint, still holds those weights
    (CheckpointChanged). The architecture and the weights' fit are checked when it loads."""
    path, fp = split_id(name)
    p = _resolve(path)
    if not p.exists():
        raise UnknownModel(f"Unknown model {_shown(name)!r}: there is no folder at {_shown(str(p))}. {_hint()}")
    if not p.is_dir():
        raise InvalidCheckpoint(f"{_shown(str(p))} is a file, not a checkpoint folder: give the folder "
                                f"that holds it. {_hint()}")
    cfg = p / "config.json"
    if not cfg.is_file():
        raise InvalidCheckpoint(f"The folder {_shown(str(p))} has no config.json, so it is not a Hugging Face "
                                f"checkpoint.{_adapter_hint(p)} {_hint()}")
    try:
        config = json.loads(cfg.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InvalidCheckpoint(f"{_shown(str(cfg))} cannot be read as JSON ({e}).") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise InvalidCheckpoint(f"{_shown(str(cfg))} names no model_type, so no architecture can be chosen.")
    if not weight_files(p):
        raise InvalidCheckpoint(f"The folder {_shown(str(p))} has no weights (*.safetensors or "
                                f"pytorch_model*.bin).{_adapter_hint(p)}")
    now = fingerprint(p)
    if fp is not None and fp != now:
        raise CheckpointChanged(
            f"Model {_shown(name)!r} names the checkpoint in {_shown(str(p))} as it was (fingerprint {fp}); the "
            f"folder now holds other files (fingerprint {now}). Its stored results stay readable; to analyse "
            f"the new weights open the folder again: {p}")
    return f"{p}#{now}"


def folder_of(model_id: str) -> Path:
    return _resolve(split_id(model_id)[0])


def config_of(model_id: str) -> dict:
    try:
        return json.loads((folder_of(model_id) / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def file_name(model_id: str) -> str:
    """A file-name-safe name for per-model files (the corpus's token tables): any other id unchanged,
    a local folder's as `local-<folder name>-<fingerprint>` (its id is an absolute path)."""
    if not looks_local(model_id):
        return model_id
    cid = canonical_id(model_id)
    path, fp = split_id(cid)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(path).name)[:60] or "model"
    return f"local-{stem}-{fp or hashlib.sha256(cid.encode()).hexdigest()[:FP_LEN]}"


# -- same weights under two ids ---------------------------------------------------------------------
def weights_fingerprint(model_id: str) -> str | None:
    """The fingerprint of the files a model loads from, where known without loading it: a local id's
    (from the id or its folder), an offline model's converted checkpoint once converted; else None."""
    from .registry import OFFLINE_MODELS, converted_dir

    if looks_local(model_id):
        cid = canonical_id(model_id)
        return split_id(cid)[1]
    m = OFFLINE_MODELS.get(model_id)
    if m is not None:
        d = converted_dir(m)
        if (d / "COMPLETE").exists():
            try:
                return fingerprint(d)
            except OSError:
                return None
    return None


def same_weights(a: str, b: str) -> bool:
    """Whether two model ids load the same files: equal ids, or (when one is a local folder) equal
    fingerprints, e.g. `smollm2-135m` and its converted folder opened by path."""
    if a == b:
        return True
    if not (isinstance(a, str) and isinstance(b, str)) or not (looks_local(a) or looks_local(b)):
        return False
    fa = weights_fingerprint(a)
    return fa is not None and fa == weights_fingerprint(b)


def trained_for(trained_on: str, info) -> bool:
    """Whether something made on model `trained_on` (an SAE's metadata model name) fits the loaded
    model `info` (ModelInfo): its id, its Hugging Face name, or the same weights under another id."""
    return trained_on in (info.model_id, info.hf_name) or same_weights(trained_on, info.model_id)


# -- registered folders -----------------------------------------------------------------------------
def _added() -> list[str]:
    f = settings.registered_models_file()
    try:
        return [line.strip() for line in f.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def registered_folders() -> list[tuple[str, str]]:
    """(folder as given, where from: "DASHBOARD_MODELS" or "models add"), env first, no repeats."""
    out, seen = [], set()
    for where, paths in (("DASHBOARD_MODELS", settings.env_model_folders()), ("models add", _added())):
        for path in paths:
            key = str(_resolve(path))
            if key not in seen:
                seen.add(key)
                out.append((path, where))
    return out


def describe(path: str, where: str = "") -> dict:
    """A registered folder as `models` lists it: its id, architecture, whether the fast paths take
    it (by architecture: the canonical-weights reader's list), or the problem that stops it."""
    from .weights import GEMMA3, LLAMA_LIKE

    d = {"path": str(_resolve(path)), "registered_by": where}
    try:
        cid = check_folder(path if looks_local(path) else "./" + path)
    except UnknownModel as e:
        return {**d, "model_id": None, "ok": False, "problem": e.to_dict()}
    arch = config_of(cid).get("model_type")
    return {**d, "model_id": cid, "ok": True, "fingerprint": split_id(cid)[1], "architecture": arch,
            "fast_paths": arch in LLAMA_LIKE + GEMMA3, "name": Path(d["path"]).name}


def local_models() -> list[dict]:
    return [describe(p, w) for p, w in registered_folders()]


def local_model_ids() -> list[str]:
    """Ids of the registered folders that pass the cheap checks (for the sidebar; no torch)."""
    return [m["model_id"] for m in local_models() if m["ok"]]


def register(path: str) -> dict:
    """Add a folder to `<store>.models.txt` (after the checks; the architecture is checked with
    transformers' own config registry). Returns its listing."""
    if not looks_local(path):
        path = "./" + path
    cid = check_folder(path)
    check_architecture(cid)
    folder = str(folder_of(cid))
    f = settings.registered_models_file()
    have = _added()
    if folder not in [str(_resolve(p)) for p in have]:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("".join(line + "\n" for line in have + [folder]))
    return describe(folder, "models add")


def unregister(path: str) -> bool:
    """Forget a folder `models add` registered; whether it was there."""
    target = str(_resolve(path))
    have = _added()
    keep = [p for p in have if str(_resolve(p)) != target]
    if len(keep) != len(have):
        settings.registered_models_file().write_text("".join(line + "\n" for line in keep))
    return len(keep) != len(have)


def check_architecture(model_id: str):
    """transformers' config for the folder; UnsupportedArchitecture when it does not know the
    model_type (imports transformers)."""
    import transformers
    from transformers import AutoConfig

    from ..errors import UnsupportedArchitecture

    folder = folder_of(model_id)
    try:
        return AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError):
        kind = config_of(model_id).get("model_type")
        raise UnsupportedArchitecture(
            f"The checkpoint in {_shown(str(folder))} has model_type {kind!r}, an architecture transformers "
            f"{transformers.__version__} does not know: fix config.json, or upgrade transformers if the "
            "architecture is newer than it.") from None
    except OSError as e:
        raise InvalidCheckpoint(f"The config of {_shown(str(folder))} cannot be read ({e}).") from None
