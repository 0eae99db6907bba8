"""One module per page (not named pages/: Streamlit would turn that into its own navigation)."""

from __future__ import annotations

from ..state import View
from . import attention, features, heads, massive, neurons, patching, prompt

PAGE_MODULES = {"prompt": prompt, "attention": attention, "heads": heads, "patching": patching,
                "massive": massive, "features": features,
                "neurons": neurons}


def render(view: View) -> View:
    return PAGE_MODULES[view.page].render(view)
