"""Backend of the interpretability dashboard: models, analyses, store, CLI.

Usable from a notebook as from the app:

    from backend import run, PromptSpec
    out = run(PromptSpec(model="smollm2-135m", text="The capital of France is"))
    out.result.top_tokens[0]   # ' Paris'
"""

from . import analyses  # noqa: F401  (registers every analysis)
from .jobs import massive_corpus, neuron_stats  # noqa: F401  (their per-item analyses, e.g. neuron contexts)
from .analyses import directions, steering, steering_eval  # noqa: F401  (directions and their uses: read, steer, ablate, evaluate)
from .analyses.attention import AttentionSpec
from .analyses.atp_star import AtPStarSpec
from .analyses.attribution import AtPSpec
from .analyses.circuits import CircuitSpec, EdgeScoresSpec
from .analyses.features import FeaturesSpec
from .analyses.head_scores import HeadScoresSpec
from .analyses.massive import MassiveAblationSpec, MassiveSpec
from .analyses.neurons import NeuronLogitSpec, NeuronsSpec
from .analyses.patching import InterventionSpec, PatchSpec
from .analyses.prompt import PromptSpec
from .analyses.token_lens import TokenLensSpec
from .errors import DashboardError
from .runner import lookup, model_info, run
from .spec import Spec

__all__ = ["run", "lookup", "model_info", "Spec", "DashboardError", "PromptSpec", "TokenLensSpec",
           "AttentionSpec", "HeadScoresSpec", "PatchSpec", "AtPSpec", "MassiveSpec", "MassiveAblationSpec",
           "NeuronsSpec", "NeuronLogitSpec", "FeaturesSpec", "AtPStarSpec", "InterventionSpec",
           "CircuitSpec", "EdgeScoresSpec"]
