"""Dashboards full on first start: the dashboard, started on an empty store with a small corpus
slice, builds the feature index in its own background thread (backend/bootstrap.py) and the
feature dashboard of a shipped SAE fills with top examples while the page is open, with no
button pressed. Real server, real browser, real model and SAE."""

from __future__ import annotations

import pytest

from backend import bootstrap, corpus
from backend.jobs.features import index as fidx
from backend.saes import load_sae

from .browser import browser_context, dashboard
from .conftest import DEFAULT_MODEL

pytestmark = [pytest.mark.browser, pytest.mark.model]
SAE = "smollm2-135m-L5-resid_pre"
TRANSCODER = "smollm2-135m-plt.L4"      # one layer of the shipped transcoder set
WINDOWS = 4
TC_WINDOWS = 1


def _a_feature_in_the_slice(model, root, sae_id: str = SAE, windows: int = WINDOWS) -> int:
    """The strongest latent of an SAE (or transcoder layer) on the first window the index will
    encode (so it has examples)."""
    import torch

    wins = fidx.select_windows(DEFAULT_MODEL, windows, corpus.DEFAULT_NAME, root)
    sae = load_sae(sae_id)
    name = sae.cfg.metadata.hook_name
    x = model.capture(model.tensor(wins[0][2]), [name], flatten_heads=True)[name][0, 1:]
    with torch.inference_mode():
        f = sae.encode(x)
    return int(f.max(0).values.argmax())


def test_plan_tolerates_a_missing_subcommand():
    step = bootstrap.Step("no-such-subcommand", [], "nothing")
    bootstrap.run_step(step)
    assert step.status == "skipped" and "not a subcommand" in step.message


def test_first_start_fills_the_feature_dashboard(model, tmp_path):
    from playwright.sync_api import sync_playwright

    root = tmp_path / "corpus"
    corpus.build(["stdlib"], root=root, max_words=4000)
    corpus.tokenize(DEFAULT_MODEL, root=root)
    f = _a_feature_in_the_slice(model, root)
    g = _a_feature_in_the_slice(model, root, TRANSCODER, TC_WINDOWS)
    env = {"DASHBOARD_STORE": str(tmp_path / "fresh.duckdb"), "DASHBOARD_CORPUS": str(root),
           "DASHBOARD_BOOTSTRAP": "1", "DASHBOARD_BOOTSTRAP_FIRST": str(WINDOWS),
           "DASHBOARD_BOOTSTRAP_WINDOWS": "0", "DASHBOARD_BOOTSTRAP_TRANSCODER_WINDOWS": str(TC_WINDOWS)}
    with dashboard(env) as base, sync_playwright() as p:
        ctx = browser_context(p, str(tmp_path / "chrome"))
        page = ctx.new_page()
        page.goto(f"{base}/?page=feature&model={DEFAULT_MODEL}&sae={SAE}&feature={f}")
        # the progress bar of the background build shows while the page is open
        page.wait_for_function("document.body.innerText.includes('First start: building the corpus indexes')",
                               timeout=120_000)
        # while the index is being built the page says so and offers no button that would start
        # the same job beside it
        page.wait_for_function("document.body.innerText.includes('being built in the background') || "
                               "document.body.innerText.includes('Top activating examples')", timeout=120_000)
        page.screenshot(path=str(tmp_path / "building.png"), full_page=True)
        text = page.inner_text("body")
        if "Top activating examples" not in text:
            assert "Build the corpus index now" not in text and "No corpus index" not in text
        # ... and the examples appear once the index lands, no button pressed
        page.wait_for_function("document.body.innerText.includes('Top activating examples')", timeout=600_000)
        text = page.inner_text("body")
        assert f"Feature #{f} of {SAE}" in text and "never fires" not in text
        page.screenshot(path=str(tmp_path / "filled.png"), full_page=True)
        # the next step of the plan indexes the shipped transcoders: a transcoder feature's
        # dashboard fills the same way, no button pressed
        page.goto(f"{base}/?page=feature&model={DEFAULT_MODEL}&sae={TRANSCODER}&feature={g}")
        page.wait_for_function("document.body.innerText.includes('Top activating examples')", timeout=600_000)
        text = page.inner_text("body")
        assert f"Feature #{g} of {TRANSCODER}" in text and "never fires" not in text
        page.screenshot(path=str(tmp_path / "transcoder.png"), full_page=True)
        ctx.close()
