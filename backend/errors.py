"""Typed errors. Every message is written for the person who caused it."""

from __future__ import annotations


class DashboardError(Exception):
    """Base class: bad input or an unavailable resource, never a bug."""

    code = "error"

    def to_dict(self) -> dict:
        return {"type": type(self).__name__, "code": self.code, "message": str(self)}


class EmptyPrompt(DashboardError):
    code = "empty_prompt"


class PromptTooLong(DashboardError):
    code = "prompt_too_long"


class UnknownModel(DashboardError):
    code = "unknown_model"


class ModelUnavailableOffline(DashboardError):
    code = "model_offline"


class InvalidSite(DashboardError):
    """A hook site that does not exist for the model (bad component, layer or head)."""

    code = "invalid_site"


class OutOfRange(DashboardError):
    code = "out_of_range"


class InvalidSpec(DashboardError):
    code = "invalid_spec"


class TamperedLink(DashboardError):
    code = "tampered_link"


class StoreError(DashboardError):
    code = "store_error"


class StoreCorrupted(StoreError):
    code = "store_corrupted"


class StoreLocked(StoreError):
    code = "store_locked"
