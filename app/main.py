"""Streamlit entry point: `streamlit run app/main.py`.

The whole view (page, model, prompt, selections) lives in the URL's query parameters, so
a copied link reopens the same view; results are read from the DuckDB store.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import streamlit as st  # noqa: E402

from app import views  # noqa: E402
from app.common import apply_pending_view, link_of  # noqa: E402
from app.state import DEFAULT_MODEL, PAGES, PROMPT_PAGES, View, read_view, view_params  # noqa: E402
from backend import bootstrap  # noqa: E402  (no torch at import; jobs import it in their thread)
from backend.errors import DashboardError  # noqa: E402
from backend.model import canonical_id, local_model_ids, looks_local, offline_model_ids  # noqa: E402

st.set_page_config(page_title="Inside the model", page_icon="🔬", layout="wide")


def _model_label(model_id: str) -> str:
    """A local folder's id (/abs/path#fingerprint) as its folder name and the fingerprint's head."""
    if not looks_local(model_id) or "#" not in model_id:
        return model_id
    path, _, fp = model_id.rpartition("#")
    return f"{Path(path).name} (local folder #{fp[:6]})"


@st.cache_resource
def serve_store():
    """Open the store once per process and serve it to CLI calls (backend/serve.py), so scripts
    run while the dashboard is open and their results show here at the next rerun."""
    from backend import serve, settings
    from backend.cli import execute
    from backend.store import default_store

    default_store()   # raises (and is retried at the next run) when the store cannot be opened
    return str(serve.start(settings.store_path(), execute))


try:
    serve_store()
except DashboardError as e:
    st.error(str(e), icon=":material/database:")

if "view" not in st.session_state:  # first run of this session: the URL is the truth
    view, problems = read_view(st.query_params.to_dict())
    st.session_state.view, st.session_state.problems = view, problems
    st.session_state.w_page, st.session_state.w_text = view.page, view.text
apply_pending_view()
view: View = st.session_state.view
if canonical_id(view.model) != view.model:   # a folder path in a link: keyed by path and fingerprint
    view = st.session_state.view = view.replace(model=canonical_id(view.model))
for p in st.session_state.problems:
    st.warning(p, icon=":material/link:")

with st.sidebar:
    st.title("Inside the model")
    page = st.radio("View", list(PAGES), format_func=PAGES.get, key="w_page")
    offline = (offline_model_ids() or [DEFAULT_MODEL]) + local_model_ids()   # + registered folders
    other = "other (hub name or local folder)…"
    choice = st.selectbox("Model", offline + [other], format_func=_model_label,
                          index=offline.index(view.model) if view.model in offline else len(offline))
    model = view.model
    if choice == other:
        typed = st.text_input("TransformerLens or Hugging Face name, or a local folder path (a Hugging Face "
                              "checkpoint: /path/to/checkpoint)",
                              value=view.model if view.model not in offline else "gpt2-small")
        model = canonical_id(typed.strip()) if typed.strip() else typed
    else:
        model = choice
    if page in PROMPT_PAGES:
        with st.form("prompt_form"):
            st.text_area("Prompt", key="w_text", height=120)
            st.form_submit_button("Run", type="primary")
    changed = (page, model, st.session_state.w_text) != (view.page, view.model, view.text)
    if changed:
        view = view.replace(page=page, model=model, text=st.session_state.w_text, key="")
        st.session_state.view = view
        st.session_state.problems = []

# First start on an empty store: the corpus jobs run in a background thread (backend/bootstrap.py);
# a progress bar refreshes itself and the page reruns whenever a step lands.
if bootstrap.ensure_started() is not None:
    @st.fragment(run_every=3)
    def _bootstrap_progress() -> None:
        s = bootstrap.status()
        if s["completed"] != st.session_state.setdefault("bootstrap_seen", s["completed"]):
            st.session_state.bootstrap_seen = s["completed"]
            st.rerun(scope="app")
        if s["running"]:
            job = f", chunk {s['job']['done']}/{s['job']['n_chunks']}" if s["job"] else ""
            st.progress(s["fraction"], text=f"First start: building the corpus indexes in the background "
                        f"(step {s['completed'] + 1}/{s['total']}: {s['step'] or 'starting'}{job}). Pages fill "
                        "as they land; the dashboard works meanwhile.")
    _bootstrap_progress()

view = views.render(view)  # a page may update its selections (and the run key)
st.session_state.view = view
params = view_params(view)
if st.query_params.to_dict() != params:
    st.query_params.from_dict(params)
with st.sidebar:
    st.divider()
    st.caption("Link to this view (opens it from the store):")
    st.code(link_of(view), language=None, wrap_lines=True)
