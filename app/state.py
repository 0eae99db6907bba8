"""View state lives in the URL: every field of a view is a query parameter.

`read_view(params)` parses untrusted query parameters into a View plus a list of problems
(non-numbers, unknown pages); `view_params(view)` is the inverse. The `key` parameter is the
run key of the page's main analysis: when a link's fields no longer hash to its key, the
link was edited or truncated, and the page says so instead of computing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_TEXT = "When Mary and John went to the store, John gave a drink to"

PAGES = {"prompt": "Prompt & logit lens", "attention": "Attention patterns", "heads": "Head scores",
         "patching": "Activation patching", "massive": "Massive activations", "features": "SAE features",
         "neurons": "Neurons", "neuron": "Neuron (corpus)", "feature": "Feature dashboard",
         "featuremap": "Feature map", "search": "Feature search", "circuits": "Circuits",
         "steering": "Directions & steering", "graph": "Attribution graph",
         "attribution_tokens": "Token attribution"}
# Pages that use the prompt box in the sidebar.
PROMPT_PAGES = ("prompt", "attention", "massive", "features", "neurons", "graph", "attribution_tokens")
# Query parameters of newer pages: page -> the View fields its link carries (the generic rule;
# the older pages spell theirs out in view_params).
PAGE_FIELDS: dict[str, tuple[str, ...]] = {
    "neuron": ("layer", "neuron"),
    "feature": ("sae", "feature"),
    "featuremap": ("sae", "feature", "colour"),
    "search": ("sae", "mode", "q", "sort", "min_out"),
    "circuits": ("task", "n_pairs", "clean", "corrupt", "answer", "wrong", "metric", "method",
                 "top_n", "removed", "circuit"),
    "steering": ("dkey", "sae", "feature", "prompt", "strength", "smode", "spos", "chat", "max_new", "temp",
                 "seed", "steer"),
    "graph": ("tcs", "node_thr", "edge_thr", "gnode", "pinned", "supers", "iv"),
    "attribution_tokens": ("amethod", "atarget", "acontrast", "asteps", "abase", "afirst", "alayers"),
    "prompt": ("lpos",),    # only when set: older prompt links are unchanged
}
IOI_CLEAN = "When Mary and John went to the store, John gave a drink to"
IOI_CORRUPT = "When Mary and John went to the store, Mary gave a drink to"
LENS_MODES = {"top": "Top token", "token": "Chosen token"}
INT_FIELDS = ("layer", "head", "n_pairs", "pos", "neuron", "atp", "feature", "top_n", "chat", "max_new", "seed",
              "steer", "afirst", "alayers")
FLOAT_FIELDS = ("abs_thr", "ratio_thr", "strength", "temp", "node_thr", "edge_thr")


@dataclass
class View:
    page: str = "prompt"
    model: str = DEFAULT_MODEL
    text: str = DEFAULT_TEXT
    layer: int = 0
    head: int = 0
    lens: str = "top"
    token: str = ""
    # activation patching
    task: str = "custom"
    n_pairs: int = 8
    clean: str = IOI_CLEAN
    corrupt: str = IOI_CORRUPT
    answer: str = " Mary"
    wrong: str = " John"
    site: str = "resid_pre"
    metric: str = "logit_diff_norm"
    direction: str = "denoising"
    pos: int = -1           # position shown for head_out_pos (-1: last)
    cell: str = ""          # the clicked cell, "layer,pos" or "layer,head"
    atp: int = 0            # 1: show attribution patching beside the sweep
    neuron: int = -1        # chosen neuron of the layer (-1: none)
    # SAE features
    sae: str = "smollm2-135m-L15-resid_pre"
    feature: int = -1       # chosen SAE feature (-1: none)
    mode: str = "token"     # feature search: "token" or "text"
    q: str = ""             # feature search query
    sort: str = ""          # feature search: "", "output_score", "input_score" or "density"
    min_out: str = ""       # feature search: minimum output score ("" = none)
    colour: str = "density"  # feature map: "density", "output_score" or "input_score"
    # circuits
    method: str = "eap"     # "eap" or "eap-ig"
    top_n: int = 50         # edges kept
    removed: str = ""       # nodes/edges removed by clicks, ";"-separated
    circuit: str = ""       # a saved circuit's id
    # directions & steering
    dkey: str = ""          # a stored direction's key ("" with feature >= 0: steer with the SAE feature)
    prompt: str = "I went for a walk today and the weather"
    strength: float = 6.0
    smode: str = "add"      # "add" or "ablate"
    spos: str = "all"       # "all", "from-instruction" or "prefix"
    chat: int = 0           # 1: the prompt goes into the chat template
    max_new: int = 32
    temp: float = 0.0
    seed: int = 0
    steer: int = 0          # 1: show (run on a miss) the steered generation of these fields
    # attribution graph
    tcs: str = ""           # transcoder set ("" = the model's shipped set)
    node_thr: float = 0.8
    edge_thr: float = 0.98
    gnode: str = ""         # the clicked node's id
    pinned: str = ""        # pinned node ids, ";"-separated
    supers: str = ""        # supernodes: "name:id,id|name:id,id"
    iv: str = ""            # an intervention: "layer_feature_pos=value;..." (=xK scales)
    # token attribution
    amethod: str = "integrated-gradients"   # "saliency", "input-x-gradient" or "integrated-gradients"
    atarget: str = ""       # the token explained ("" = the model's top next token)
    acontrast: str = ""     # "" or the dispreferred token: explain logit(atarget) - logit(acontrast)
    asteps: str = "auto"    # IG steps: "auto" or N (1-512)
    abase: str = "zero"     # IG baseline: "zero", "pad" or "mask"
    afirst: int = 0         # 1: interpolate position 0 too (default: held at its own embedding)
    alayers: int = 0        # 1: the layer view (the same method at every layer's resid_pre)
    lpos: str = ""          # prompt page: the position marked in the logit lens ("" = none)
    # massive activations
    abs_thr: float = 100.0
    ratio_thr: float = 1000.0
    key: str = ""

    def replace(self, **kw) -> "View":
        return dataclasses.replace(self, **kw)


DEFAULT_VIEW = View()


def read_view(params: Mapping[str, str]) -> tuple[View, list[str]]:
    """A View from query parameters, and the problems found in them (never raises)."""
    view, problems = View(), []
    names = {f.name for f in dataclasses.fields(View)}
    for name, raw in params.items():
        if name not in names:
            continue  # foreign parameters (e.g. added by a proxy) are ignored
        if name in INT_FIELDS:
            try:
                setattr(view, name, int(raw))
            except ValueError:
                problems.append(f"The link's {name} {raw!r} is not a whole number; using {getattr(view, name)}.")
        elif name in FLOAT_FIELDS:
            try:
                setattr(view, name, float(raw))
            except ValueError:
                problems.append(f"The link's {name} {raw!r} is not a number; using {getattr(view, name)}.")
        else:
            setattr(view, name, raw)
    if view.page not in PAGES:
        problems.append(f"The link names an unknown page {view.page!r}; showing {PAGES['prompt']}.")
        view.page = "prompt"
    if view.lens not in LENS_MODES:
        problems.append(f"Unknown logit-lens mode {view.lens!r}; showing the top token.")
        view.lens = "top"
    return view, problems


def view_params(view: View) -> dict[str, str]:
    """The query parameters of a view (only what the page uses)."""
    p = {"page": view.page, "model": view.model}
    if view.page in PROMPT_PAGES:
        p["text"] = view.text
    for name in PAGE_FIELDS.get(view.page, ()):
        value = getattr(view, name)
        if value != "":
            p[name] = f"{value:g}" if isinstance(value, float) else str(value)
    if view.page == "prompt":
        p["lens"] = view.lens
        if view.lens == "token" and view.token:
            p["token"] = view.token
    if view.page == "attention":
        p["layer"], p["head"] = str(view.layer), str(view.head)
    if view.page == "neurons":
        p["layer"] = str(view.layer)
        if view.neuron >= 0:
            p["neuron"] = str(view.neuron)
    if view.page == "features":
        p["sae"] = view.sae
    if view.page == "massive":
        p["layer"] = str(view.layer)
        p["abs_thr"], p["ratio_thr"] = f"{view.abs_thr:g}", f"{view.ratio_thr:g}"
    if view.page == "patching":
        p.update(task=view.task, site=view.site, metric=view.metric, direction=view.direction)
        if view.task == "custom":
            p.update(clean=view.clean, corrupt=view.corrupt, answer=view.answer, wrong=view.wrong)
        else:
            p["n_pairs"] = str(view.n_pairs)
        if view.site == "head_out_pos":
            p["pos"] = str(view.pos)
        if view.cell:
            p["cell"] = view.cell
        if view.atp:
            p["atp"] = "1"
    if view.key:
        p["key"] = view.key
    return p
