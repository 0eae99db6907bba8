"""One module per page (not named pages/: Streamlit would turn that into its own navigation)."""

from __future__ import annotations

from ..state import View
from . import attention, heads, prompt

PAGE_MODULES = {"prompt": prompt, "attention": attention, "heads": heads}


def render(view: View) -> View:
    return PAGE_MODULES[view.page].render(view)
