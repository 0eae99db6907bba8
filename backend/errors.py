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


class InvalidCheckpoint(UnknownModel):
    """A local path that is not a loadable Hugging Face checkpoint folder: a file, a folder with
    no config.json or no weights, weights that do not fit the config, an unreadable tokenizer.
    A subclass of UnknownModel, so whoever handles an unknown model handles it too."""

    code = "invalid_checkpoint"


class UnsupportedArchitecture(InvalidCheckpoint):
    """A checkpoint whose architecture transformers (or TransformerLens's bridge) does not know."""

    code = "unsupported_architecture"


class CheckpointChanged(InvalidCheckpoint):
    """A local model id names a checkpoint as it was (its fingerprint); the folder now holds another."""

    code = "checkpoint_changed"


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


class NoMassiveActivations(DashboardError):
    """No activation meets the massive-activation criterion where one is needed."""

    code = "no_massive"


class NoChatTemplate(DashboardError):
    """A chat-format feature (the chat option, CAA, post-instruction positions, the
    harmfulness/refusal study) on a model whose tokenizer has no chat template."""

    code = "no_chat_template"


class PromptLengthMismatch(DashboardError):
    """Patching pairs a clean and a corrupted prompt of different token lengths."""

    code = "prompt_length_mismatch"


class NotSingleToken(DashboardError):
    """An answer or wrong answer that is not exactly one token."""

    code = "not_single_token"


class IdenticalAnswers(DashboardError):
    """The answer and the wrong answer are the same token."""

    code = "identical_answers"


class EmptyDataset(DashboardError):
    """A patching task with no prompt pair."""

    code = "empty_dataset"


class UnknownSAE(DashboardError):
    """An SAE id that is neither shipped, a folder on disk, nor a SAELens release."""

    code = "unknown_sae"


class SAEUnavailableOffline(DashboardError):
    code = "sae_offline"


class SAEMismatch(DashboardError):
    """An SAE used with a model or hook it was not trained for."""

    code = "sae_mismatch"


class FeatureIndexMissing(DashboardError):
    """The corpus index (or the map) of an SAE has not been built, or was built for other weights."""

    code = "feature_index_missing"


class EmptySearch(DashboardError):
    code = "empty_search"
