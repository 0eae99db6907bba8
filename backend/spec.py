"""Specs and results: what an analysis is asked, and what it answers.

A Spec is a frozen, validated, JSON-serialisable description of one analysis run (model,
prompt, parameters). Its `key()` (a hash of its canonical JSON, kind and version) keys the
stored Result, so the same question is computed once and read many times.

A Result is a frozen dataclass whose fields are numpy arrays (stored as DuckDB array
columns) or JSON-able values (stored in a JSON column). No pickles anywhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, ClassVar

import numpy as np

from .errors import EmptyPrompt, InvalidSpec

SPEC_KINDS: dict[str, type["Spec"]] = {}


@dataclasses.dataclass(frozen=True)
class Spec:
    """Base class. Subclasses set KIND (unique) and VERSION (bump when results change)."""

    KIND: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1
    KEY_NEUTRAL: ClassVar[dict] = {}     # field -> default: not part of the key at that default
    model: str

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.KIND:
            SPEC_KINDS[cls.KIND] = cls

    def __post_init__(self):
        if not isinstance(self.model, str) or not self.model.strip():
            raise InvalidSpec("A model id is required.")
        from .model.local import canonical_id

        # A local checkpoint folder is keyed by its path and fingerprint (backend/model/local.py), so
        # a checkpoint saved over another at the same path never reads the other's results.
        object.__setattr__(self, "model", canonical_id(self.model))
        self.validate()

    def validate(self) -> None:
        """Subclasses raise a DashboardError for bad fields."""

    def fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_dict(self) -> dict[str, Any]:
        """The spec as stored and hashed. Fields named in KEY_NEUTRAL (added after results were
        stored) are left out while at their default, so the keys of older questions stay the same."""
        d = {"kind": self.KIND, **self.fields()}
        for name, default in self.KEY_NEUTRAL.items():
            if name in d and d[name] == default:
                del d[name]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    def key(self) -> str:
        payload = json.dumps({"v": self.VERSION, **self.to_dict()}, sort_keys=True,
                             separators=(",", ":"), ensure_ascii=False)
        return self.KIND + "-" + hashlib.sha256(payload.encode()).hexdigest()[:20]

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Spec":
        """Rebuild a spec from untrusted data (a link, a CLI call); InvalidSpec if it is wrong."""
        if not isinstance(d, dict) or d.get("kind") not in SPEC_KINDS:
            raise InvalidSpec(f"Unknown analysis kind {d.get('kind') if isinstance(d, dict) else d!r}.")
        cls = SPEC_KINDS[d["kind"]]
        names = {f.name: f for f in dataclasses.fields(cls)}
        extra = set(d) - set(names) - {"kind"}
        if extra:
            raise InvalidSpec(f"Unexpected fields for {cls.KIND}: {sorted(extra)}.")
        kwargs = {}
        for name, value in d.items():
            if name == "kind":
                continue
            kwargs[name] = _coerce(value, names[name].type, name)
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise InvalidSpec(f"Bad fields for {cls.KIND}: {e}") from None


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    ann = str(annotation)
    if isinstance(value, list):
        value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, str),
        "bool": isinstance(value, bool),
    }
    base = ann.split("|")[0].strip()
    if "None" in ann and value is None:
        return None
    if base in ok and not ok[base]:
        raise InvalidSpec(f"Field {name!r} should be {base}, got {value!r}.")
    return float(value) if base == "float" else value


def check_text(text: str) -> None:
    if not isinstance(text, str) or not text.strip():
        raise EmptyPrompt("The prompt is empty: type some text to analyse.")


@dataclasses.dataclass(frozen=True)
class Result:
    """Base class of analysis results: numpy fields go to arrays, the rest to JSON."""

    def to_record(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        meta, arrays = {}, {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            (arrays if isinstance(v, np.ndarray) else meta)[f.name] = v
        return meta, arrays

    @classmethod
    def from_record(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]):
        return cls(**meta, **arrays)
