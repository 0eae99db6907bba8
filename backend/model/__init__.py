"""Models: the registry and loading (loading.py; local checkpoint folders in local.py), the one interface to a loaded model
(interface.py: tokens, forwards with hooks, captures, gradients, unembedding, weights) and
generation with a KV cache (generate.py). Nothing outside this package touches the bridge."""

from .interface import LoadedModel, ModelInfo, hook_layer
from .local import (canonical_id, local_model_ids, local_models, looks_local, register, same_weights, trained_for,
                    unregister)
from .loading import (DEFAULT_MODEL, OFFLINE_MODELS, OfflineModel, _network_up, available_models,
                      check_model_id, converted_dir, is_loaded, load_model, offline_model_ids,
                      resolve_hub_name)

__all__ = ["LoadedModel", "ModelInfo", "hook_layer", "DEFAULT_MODEL", "OFFLINE_MODELS", "OfflineModel",
           "available_models", "check_model_id", "converted_dir", "is_loaded", "load_model", "offline_model_ids",
           "resolve_hub_name", "_network_up", "canonical_id", "local_model_ids", "local_models", "looks_local",
           "register", "same_weights", "trained_for", "unregister"]
