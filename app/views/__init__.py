"""One module per page (not a folder called pages/: Streamlit would turn that into its own
navigation). A page module has `render(view) -> View`. Modules are named as their page id,
except where two ids differ by a plural (the ids are in shared links and stay): the pages about
one prompt are prompt_*, the corpus-wide pages of one neuron or feature *_dashboard, and the token
attribution page (id attribution_tokens) is named as its analysis."""

from __future__ import annotations

import importlib

from ..state import View


MODULES = {"neurons": "prompt_neurons", "features": "prompt_features", "neuron": "neuron_dashboard",
           "feature": "feature_dashboard", "attribution_tokens": "token_attribution"}


def render(view: View) -> View:
    module = importlib.import_module(f".{MODULES.get(view.page, view.page)}", __package__)
    return module.render(view)
