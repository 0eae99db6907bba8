"""What every page shares: calling the backend with clear messages, the status line, the link."""

from __future__ import annotations

import json
from urllib.parse import urlencode

import streamlit as st

import backend
from backend.errors import DashboardError

from .state import View, view_params


def fetch(spec, what: str):
    """The outcome of a spec: read from the store, or computed with a visible status.

    Returns None (after showing the error) when the input is bad or a resource is missing.
    """
    try:
        out = backend.lookup(spec)
        if out is None:
            with st.status(f"Computing {what}…", expanded=False) as status:
                out = backend.run(spec, progress=lambda msg: status.update(label=msg))
                status.update(label=f"Computed {what} in {out.compute_seconds:.2f} s", state="complete")
    except DashboardError as e:
        st.error(f"{e}", icon=":material/warning:")
        return None
    show_status(out, what)
    return out


def main_result(view: View, spec, what: str) -> tuple[View, object | None]:
    """A page's main result: the link's key checked against the spec, the outcome fetched, and
    the view's key set to its run key. (view, None) when there is no valid spec, the link was
    altered or the run failed (each already said in the page)."""
    if spec is None or not check_link_key(view, spec):
        return view, None
    out = fetch(spec, what)
    if out is None:
        return view, None
    downloads(out.run_key, spec.KIND)
    return view.replace(key=out.run_key), out


def form_spec(view: View, form, spec_of):
    """A form (navigating to the view it returns if that differs), then the spec built from the
    view; None when the view makes a bad spec (said in the page)."""
    new = form(view)
    if new != view:
        navigate(new)
    try:
        return spec_of(view)
    except DashboardError as e:
        st.error(str(e), icon=":material/warning:")
        return None


def form_result(view: View, form, spec_of, what: str) -> tuple[View, object | None]:
    """A form page's main result: form_spec, then main_result."""
    spec = form_spec(view, form, spec_of)
    if spec is None:
        return view, None
    return main_result(view, spec, what)


def first_start_running() -> bool:
    """The first-start build of the corpus indexes (backend/bootstrap.py) is running in this process."""
    from backend import bootstrap

    b = bootstrap.current()
    return b is not None and b.running


def first_start_building(what: str) -> bool:
    """True, after saying so in the page, while the first-start build (backend/bootstrap.py) runs:
    it is already computing `what`, so the page offers no button that would start the same job
    beside it (the page reruns when that step lands)."""
    if not first_start_running():
        return False
    st.info(f"{what} is being built in the background on this first start (progress bar at the top of "
            "the page); this page fills in when that step lands. The rest of the dashboard works meanwhile.",
            icon=":material/hourglass_top:")
    return True


def run_job_button(label: str, start, key: str, done=None, primary: bool = False) -> None:
    """The page side of a corpus job: a button that runs `start(progress)` (a backend job taking
    the jobs protocol's progress(done, total, message)) under an st.progress bar; a bad input or
    a missing resource is said in the page; then `done(summary)` (a message) and a rerun, so the
    page reads what the job stored."""
    if not st.button(label, key=key, type="primary" if primary else "secondary"):
        return
    bar = st.progress(0.0, text="starting…")
    try:
        summary = start(lambda d, n, m: bar.progress(d / max(n, 1), text=m))
    except DashboardError as e:
        st.error(str(e), icon=":material/warning:")
        return
    if done is not None:
        st.success(done(summary))
    st.rerun()


def pair_inputs(view: View) -> dict:
    """The prompt-pair fields of a task form (inside an st.form): clean and corrupted prompts,
    answer, wrong answer, pairs of a built-in task. The page twin of backend.tasks.PairTaskSpec."""
    c1, c2 = st.columns(2)
    out = {"clean": c1.text_input("Clean prompt", view.clean),
           "corrupt": c2.text_input("Corrupted prompt (same number of tokens)", view.corrupt)}
    c1, c2, c3 = st.columns([1, 1, 2])
    out["answer"] = c1.text_input("Answer (one token)", view.answer)
    out["wrong"] = c2.text_input("Wrong answer (one token)", view.wrong)
    out["n_pairs"] = int(c3.number_input("Pairs for a built-in task (averaged)", 1, 64, view.n_pairs))
    return out


def metrics_row(items: list[tuple[str, str]]) -> None:
    """A row of st.metric boxes: (label, formatted value) each."""
    for col, (label, value) in zip(st.columns(len(items)), items):
        col.metric(label, value)


def downloads(run_key: str, kind: str) -> None:
    """Download buttons for a stored result: its JSON and, where the kind has figures, the main
    figure as HTML (the files are made only when a button is pressed)."""
    from backend import export
    from backend.figures.exports import BUILDERS

    def result_json() -> bytes:
        return json.dumps(export.result_record(run_key), ensure_ascii=False).encode()

    def figure_html() -> str:
        fig = next(iter(export.figures_of(run_key).values()))
        return fig.to_html(include_plotlyjs=True, full_html=True)

    row = st.container(horizontal=True)
    row.download_button("Result (JSON)", result_json, file_name=f"{run_key}.json", mime="application/json",
                            key=f"dl-json-{run_key}", on_click="ignore", icon=":material/download:")
    if kind in BUILDERS:
        row.download_button("Figure (HTML)", figure_html, file_name=f"{run_key}.html", mime="text/html",
                                key=f"dl-html-{run_key}", on_click="ignore", icon=":material/download:")


def show_status(out, what: str) -> None:
    if out.from_store:
        st.caption(f"{what}: read from the store in {out.read_seconds * 1000:.1f} ms "
                   f"(computed once in {out.stored_compute_seconds:.2f} s) · run `{out.run_key}`")
    else:
        st.caption(f"{what}: computed in {out.compute_seconds:.2f} s and stored · run `{out.run_key}`")


def model_dims(model_id: str) -> dict | None:
    try:
        return backend.model_info(model_id)
    except DashboardError as e:
        st.error(str(e), icon=":material/warning:")
        return None


def link_of(view: View) -> str:
    base = ""
    try:
        base = (st.context.url or "").split("?")[0]
    except Exception:  # not served over HTTP (AppTest)
        pass
    return f"{base}?{urlencode(view_params(view))}"


def check_link_key(view: View, spec) -> bool:
    """False (after saying so) when the link's key does not match its fields."""
    if not view.key or view.key == spec.key():
        return True
    if st.session_state.get("accept_edited_link"):
        return True
    st.error("This link was altered: its fields no longer match its run key "
             f"(`{view.key}` ≠ `{spec.key()}`), so it may not show what was shared. Nothing was run.",
             icon=":material/link:")
    if st.button("Open with the link's fields as they are"):
        st.session_state["accept_edited_link"] = True
        st.rerun()
    return False


# Every widget seeded from the view has a key starting with "w_" (see `synced`); after a
# navigation they are all dropped, so the next run seeds them from the new view.
WIDGET_PREFIX = "w_"


def navigate(view: View) -> None:
    """Show another view (e.g. after a click): widgets are re-seeded from it on the next run."""
    st.session_state.pending_view = view
    st.rerun()


def apply_pending_view() -> None:
    """Called by the entry point before any widget exists."""
    view = st.session_state.pop("pending_view", None)
    if view is None:
        return
    st.session_state.view = view
    st.session_state.w_page, st.session_state.w_text = view.page, view.text
    for k in [k for k in st.session_state if str(k).startswith(WIDGET_PREFIX)]:
        if k not in ("w_page", "w_text"):
            st.session_state.pop(k, None)


def make_spec(cls, **fields):
    """A spec, or None after showing why the fields are not valid."""
    try:
        return cls(**fields)
    except DashboardError as e:
        st.error(str(e), icon=":material/warning:")
        return None


def synced(key: str, value):
    """Seed a widget's state from the view once; afterwards the widget owns it."""
    if key not in st.session_state:
        st.session_state[key] = value
    return key


def token_chips(tokens: list[str]) -> None:
    from html import escape

    from backend.figures import fmt_token

    chips = "".join(
        f"<span title='position {i}' style='display:inline-block;margin:2px;padding:1px 5px;"
        f"border:1px solid #bbb;border-radius:4px;font-family:monospace;font-size:0.9em'>"
        f"<sub style='color:#888'>{i}</sub>{escape(fmt_token(t))}</span>" for i, t in enumerate(tokens))
    st.markdown(f"<div>{chips}</div>", unsafe_allow_html=True)
