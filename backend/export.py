"""Taking things out of the store: results to JSON, corpus tables to Parquet, figures to HTML/PNG.

    python -m backend export result --key prompt-3f2a... --out prompt.json
    python -m backend export table --table neuron_stats --out neuron_stats.parquet
    python -m backend export figure --key prompt-3f2a... --out lens.html     (or .png)
    python -m backend export feature --sae smollm2-135m-L15-resid_pre --feature 178 --out f.json

A result's JSON is self-describing: {"run_key", "kind", "model", "spec", "meta", "arrays":
{name: {"dtype", "shape", "data" (nested lists)}}, "compute_seconds"}; `spec` rebuilds it
(`backend.Spec.from_dict`). Tables go out through DuckDB's own COPY ... (FORMAT parquet),
so they read back with `duckdb.read_parquet`, pandas or pyarrow. Figures are built by the
same Plotly builders as the pages (backend/figures/, below both app and backend;
figures/exports.py maps a result kind to its figures); HTML is Plotly's own export
(self-contained, plotly.js inlined), PNG is rendered by Kaleido when it is installed, else by
the headless Chromium the browser tests use.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DashboardError, InvalidSpec
from .store import Store, default_store

# Corpus tables worth taking out whole (large, long-format). Any other table of the store can
# be named too; these are the ones the help lists.
CORPUS_TABLES = ("feature_acts_by_feature", "feature_stats", "feature_hist", "feature_top_tokens",
                 "feature_windows", "feature_indexes", "sae_logit_effects", "sae_similar", "sae_maps",
                 "neuron_stats", "neuron_top", "neuron_hist", "massive_part", "massive_layer_part",
                 "saved_circuits", "runs")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ExportError(DashboardError):
    code = "export_failed"


class NotStored(DashboardError):
    code = "not_stored"


def _jsonable(x: Any) -> Any:
    """numpy → lists; NaN/inf → None (JSON has neither)."""
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return v if math.isfinite(v) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def result_record(run_key: str, store: Store | None = None) -> dict:
    """A stored result as one JSON-able dict (see the module docstring); NotStored if absent."""
    store = store or default_store()
    rec = store.get(run_key)
    if rec is None:
        raise NotStored(f"No stored result has the key {run_key!r}.")
    arrays = {name: {"dtype": str(a.dtype) if a.dtype != object else "str", "shape": list(a.shape),
                     "data": _jsonable(a)} for name, a in rec["arrays"].items()}
    return {"run_key": run_key, "kind": rec["kind"], "model": rec["spec"].get("model"),
            "spec": rec["spec"], "meta": _jsonable(rec["meta"]), "arrays": arrays,
            "compute_seconds": rec["compute_seconds"]}


def _out_path(out: str | Path, suffixes: tuple[str, ...]) -> Path:
    p = Path(out)
    if p.suffix.lower() not in suffixes:
        raise InvalidSpec(f"The output file must end in {' or '.join(suffixes)}, got {p.name!r}.")
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_bytes(data)
    tmp.replace(path)


def export_result(run_key: str, out: str | Path, store: Store | None = None) -> dict:
    path = _out_path(out, (".json",))
    rec = result_record(run_key, store)
    _write_atomic(path, json.dumps(rec, ensure_ascii=False).encode())
    return {"path": str(path), "run_key": run_key, "kind": rec["kind"], "bytes": path.stat().st_size,
            "arrays": sorted(rec["arrays"])}


def table_names(store: Store | None = None) -> list[str]:
    store = store or default_store()
    rows = store.cursor().execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main' ORDER BY 1").fetchall()
    return [r[0] for r in rows]


def export_table(table: str, out: str | Path, store: Store | None = None, where: dict | None = None) -> dict:
    """A store table (optionally filtered by column = value pairs) to a Parquet file."""
    store = store or default_store()
    if not isinstance(table, str) or not _IDENT.match(table) or table not in table_names(store):
        raise InvalidSpec(f"No table {table!r} in the store. Corpus tables: {', '.join(CORPUS_TABLES)}.")
    path = _out_path(out, (".parquet",))
    cur = store.cursor()
    cols = {r[0] for r in cur.execute("SELECT column_name FROM information_schema.columns "
                                      "WHERE table_name = ?", [table]).fetchall()}
    conds, params = [], []
    for col, value in (where or {}).items():
        if col not in cols:
            raise InvalidSpec(f"Table {table!r} has no column {col!r}; it has {', '.join(sorted(cols))}.")
        conds.append(f'"{col}" = ?')
        params.append(value)
    sql = f'SELECT * FROM "{table}"' + (" WHERE " + " AND ".join(conds) if conds else "")
    tmp = path.with_name(path.name + ".partial")
    # COPY takes no prepared parameters in its inner query: go through Arrow for filtered ones.
    if params:
        tab = cur.sql(sql, params=params).to_arrow_table()
        import pyarrow.parquet as pq

        pq.write_table(tab, tmp)
        n = tab.num_rows
    else:
        cur.execute(f"COPY ({sql}) TO '{_sql_path(tmp)}' (FORMAT parquet)")
        n = cur.execute(f"SELECT count(*) FROM \"{table}\"").fetchall()[0][0]
    tmp.replace(path)
    return {"path": str(path), "table": table, "rows": int(n), "bytes": path.stat().st_size}


def _sql_path(p: Path) -> str:
    return str(p).replace("'", "''")


# -- figures ------------------------------------------------------------------------------
def figures_of(run_key: str, store: Store | None = None) -> dict:
    """{name: plotly Figure} for a stored result, built by the pages' own figure builders."""
    from .figures.exports import figures_for  # plotly only: no streamlit, no torch

    from .runner import ANALYSES

    store = store or default_store()
    rec = store.get(run_key)
    if rec is None:
        raise NotStored(f"No stored result has the key {run_key!r}.")
    analysis = ANALYSES.get(rec["kind"])
    figs = figures_for(rec["kind"], analysis.result_cls.from_record(rec["meta"], rec["arrays"]),
                       rec["spec"]) if analysis else {}
    if not figs:
        raise ExportError(f"No figure is defined for results of kind {rec['kind']!r}; "
                          "export it as JSON instead.")
    return figs


def write_figure(fig, out: str | Path) -> Path:
    """A Plotly figure to .html (Plotly's own export) or .png (Kaleido, else headless Chromium)."""
    path = _out_path(out, (".html", ".png"))
    if path.suffix.lower() == ".html":
        fig.write_html(str(path), include_plotlyjs=True, full_html=True)
        return path
    try:
        import kaleido  # noqa: F401

        fig.write_image(str(path))
        return path
    except Exception:  # Kaleido absent or unable to find its browser: use Chromium ourselves
        pass
    _png_with_chromium(fig, path)
    return path


def _png_with_chromium(fig, path: Path) -> None:
    import os
    import tempfile

    chromium = os.environ.get("DASHBOARD_CHROMIUM", "/usr/bin/chromium")
    if not Path(chromium).exists():
        raise ExportError("PNG export needs Kaleido (pip install kaleido) or Chromium "
                          f"({chromium} not found; apt-get install chromium). HTML export works without.")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise ExportError("PNG export needs Kaleido or Playwright (pip install playwright).") from None
    width = int(fig.layout.width or 1000)
    height = int(fig.layout.height or 600)
    with tempfile.TemporaryDirectory(prefix="export-") as tmp:
        html = Path(tmp) / "figure.html"
        fig.write_html(str(html), include_plotlyjs=True, full_html=True,
                       config={"staticPlot": True}, default_width=f"{width}px", default_height=f"{height}px")
        args = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]
        with sync_playwright() as p:
            ctx = p.chromium.launch_persistent_context(str(Path(tmp) / "profile"), executable_path=chromium,
                                                       headless=True, args=args,
                                                       viewport={"width": width + 20, "height": height + 20})
            try:
                page = ctx.new_page()
                page.goto(html.as_uri())
                page.wait_for_selector(".js-plotly-plot .main-svg", timeout=30_000)
                page.locator(".js-plotly-plot").first.screenshot(path=str(path))
            finally:
                ctx.close()


def export_figure(run_key: str, out: str | Path, name: str | None = None, store: Store | None = None) -> dict:
    figs = figures_of(run_key, store)
    if name is None:
        name = next(iter(figs))
    if name not in figs:
        raise InvalidSpec(f"No figure {name!r} for this result; it has {', '.join(figs)}.")
    path = write_figure(figs[name], out)
    return {"path": str(path), "run_key": run_key, "figure": name, "figures": list(figs),
            "bytes": path.stat().st_size}


# -- a feature, in a Neuronpedia-like shape ------------------------------------------------
def feature_record(sae_id: str, feature: int, store: Store | None = None) -> dict:
    """A feature's dashboard as JSON shaped like Neuronpedia's feature export: the SAE and
    index, activations (top examples with per-token values), explanations (our generated
    label, marked as generated), logit effects (pos/neg strings and values), the histogram
    and density. What our dashboard has beyond that comes under "extra"."""
    from .jobs.features.query import feature_dashboard
    from .jobs.features.scores import feature_scores
    from .saes import sae_info

    store = store or default_store()
    d = feature_dashboard(store, sae_id, int(feature))
    d.pop("index", None)
    d.pop("seconds", None)
    d["model"] = sae_info(sae_id)["model"]
    scores = feature_scores(store, sae_id, int(feature), compute=False)   # what is stored; never computes
    d.update({k: scores.get(k) for k in ("label", "vocab_proj", "token_change", "input_score", "output_score")})
    return neuronpedia_shape(sae_id, int(feature), d)


def neuronpedia_shape(sae_id: str, feature: int, d: dict) -> dict:
    d = _jsonable(d)
    acts = []
    for ex in d.get("top") or []:
        values = [0.0 if v is None else v for v in ex.get("acts") or []]
        acts.append({"tokens": ex.get("tokens") or [], "values": values, "maxValue": ex.get("value"),
                     "maxValueTokenIndex": ex.get("focus"), "doc": ex.get("doc"), "pos": ex.get("pos")})
    logits = d.get("logits") or {}
    pos, neg = logits.get("promoted") or [], logits.get("suppressed") or []
    label = d.get("label")
    stats = d.get("stats") or {}
    hist = d.get("histogram") or {}
    return {
        "modelId": d.get("model"), "layer": sae_id, "index": str(feature),
        "activations": acts,
        "explanations": ([{"description": label, "typeName": "generated",
                           "explanationModelName": "none: built from the feature's scores and top examples"}]
                         if label else []),
        "pos_str": [x.get("token") for x in pos], "pos_values": [x.get("value") for x in pos],
        "neg_str": [x.get("token") for x in neg], "neg_values": [x.get("value") for x in neg],
        "frac_nonzero": stats.get("density"), "maxActApprox": stats.get("max"),
        "freq_hist_data_bar_heights": hist.get("counts"), "freq_hist_data_bar_values": hist.get("edges"),
        "extra": {k: v for k, v in d.items() if k not in ("top", "logits", "histogram", "label", "model")},
    }


# -- CLI ----------------------------------------------------------------------------------
def export_graph(key: str, out: str, fmt: str, store: Store | None = None) -> dict:
    """A stored attribution graph: circuit-tracer's Graph .pt (the unpruned graph, recomputed
    from its spec) or the frontend JSON of the pruned graph (from the store)."""
    from .analyses.graph import GraphSpec, export_circuit_tracer, neuronpedia_json
    from .runner import lookup
    from .spec import Spec

    if fmt not in ("circuit-tracer", "neuronpedia"):
        raise InvalidSpec(f"export graph writes --format circuit-tracer (.pt) or neuronpedia (.json), not {fmt!r}.")
    store = store or default_store()
    rec = store.get(key)
    if rec is None or not key.startswith("graph-"):
        raise NotStored(f"No stored attribution graph has the key {key!r}.")
    spec = Spec.from_dict(json.loads(rec["spec"]) if isinstance(rec["spec"], str) else rec["spec"])
    assert isinstance(spec, GraphSpec)
    if fmt == "circuit-tracer":
        path = _out_path(out, (".pt",))
        tmp = path.with_suffix(".pt.partial")
        info = export_circuit_tracer(spec, tmp)
        tmp.replace(path)
        return {**info, "path": str(path), "bytes": path.stat().st_size, "run_key": key}
    path = _out_path(out, (".json",))
    outcome = lookup(spec, store)
    _write_atomic(path, json.dumps(_jsonable(neuronpedia_json(spec, outcome.result, path.stem))).encode())
    return {"path": str(path), "format": "neuronpedia", "run_key": key, "bytes": path.stat().st_size}


def add_cli_args(p) -> None:
    p.add_argument("what", choices=["result", "table", "figure", "feature", "tables", "graph"],
                   help="result (JSON), table (Parquet), figure (HTML/PNG), feature (Neuronpedia-like JSON), "
                        "tables (list the store's tables), graph (--format circuit-tracer: .pt of the unpruned "
                        "graph; --format neuronpedia: the pruned graph's frontend JSON)")
    p.add_argument("--format", choices=["json", "text", "circuit-tracer", "neuronpedia"], default="text",
                   help="how this call prints (json, text); for `export graph`, the file format")
    p.add_argument("--key", help="run key of a stored result (result, figure)")
    p.add_argument("--table", help="store table (table): " + ", ".join(CORPUS_TABLES))
    p.add_argument("--where", action="append", default=[], metavar="COLUMN=VALUE",
                   help="filter rows of a table (repeatable; integers compare as integers)")
    p.add_argument("--figure", help="which figure of the result (figure; default: the first)")
    p.add_argument("--sae", help="SAE id (feature)")
    p.add_argument("--feature", type=int, help="feature index (feature)")
    p.add_argument("--out", help="output file (.json, .parquet, .html or .png)")


def _where(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise InvalidSpec(f"--where takes COLUMN=VALUE, got {item!r}.")
        k, v = item.split("=", 1)
        out[k.strip()] = int(v) if re.fullmatch(r"-?\d+", v.strip()) else v
    return out


def run_cli(a) -> dict:
    need = {"result": ("key", "out"), "table": ("table", "out"), "figure": ("key", "out"),
            "feature": ("sae", "feature", "out"), "tables": (), "graph": ("key", "out")}[a.what]
    missing = [f"--{n}" for n in need if getattr(a, n) is None]
    if missing:
        raise InvalidSpec(f"export {a.what} needs {' and '.join(missing)}.")
    if a.what == "tables":
        return {"tables": table_names()}
    if a.what == "result":
        return export_result(a.key, a.out)
    if a.what == "table":
        return export_table(a.table, a.out, where=_where(a.where))
    if a.what == "figure":
        return export_figure(a.key, a.out, a.figure)
    if a.what == "graph":
        return export_graph(a.key, a.out, a.format)
    rec = feature_record(a.sae, a.feature)
    path = _out_path(a.out, (".json",))
    _write_atomic(path, json.dumps(rec, ensure_ascii=False).encode())
    return {"path": str(path), "sae": a.sae, "feature": a.feature, "bytes": path.stat().st_size}
