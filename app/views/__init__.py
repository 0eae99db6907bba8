"""One module per page, named as the page (not a folder called pages/: Streamlit would turn
that into its own navigation). A page module has `render(view) -> View`."""

from __future__ import annotations

import importlib

from ..state import View


def render(view: View) -> View:
    module = importlib.import_module(f".{view.page}", __package__)
    return module.render(view)
