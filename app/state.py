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
         "attribution_tokens": "Token attribution", "probes": "Probes"}
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
                 "top_n", "removed", "circuit", "tau", "cview"),
    "steering": ("dkey", "sae", "feature", "prompt", "strength", "smode", "spos", "chat", "max_new", "temp",
                 "seed", "steer", "snorm"),
    "graph": ("tcs", "node_thr", "edge_thr", "gnode", "pinned", "supers", "iv"),
    "attribution_tokens": ("amethod", "atarget", "acontrast", "asteps", "abase", "afirst", "alayers"),
    "probes": ("study",   # each study appends its own fields here
               "cl_n", "cl_samples", "cl_temp", "cl_seed", "cl_layer", "hr_layer", "hr_strength", "hr_show",
               "sp_layers", "sp_max", "sp_epochs", "tc_concept", "tc_random", "tc_class", "tc_target", "tc_versus",
               "tc_layers", "tc_n"),
    "prompt": ("lpos",),    # only when set: older prompt links are unchanged
}
OPTIONAL_FLAGS = ("snorm",)   # in a link only when on: links made before the flag are unchanged
IOI_CLEAN = "When Mary and John went to the store, John gave a drink to"
IOI_CORRUPT = "When Mary and John went to the store, Mary gave a drink to"
LENS_MODES = {"top": "Top token", "token": "Chosen token"}
INT_FIELDS = ("layer", "head", "n_pairs", "pos", "neuron", "atp", "feature", "top_n", "chat", "max_new", "seed",
              "steer", "afirst", "alayers", "snorm")
FLOAT_FIELDS = ("abs_thr", "ratio_thr", "strength", "temp", "node_thr", "edge_thr")
INT_FIELDS += ("cl_n", "cl_samples", "cl_seed", "cl_layer", "hr_layer", "hr_show")   # probes: CLUE, harm-refusal
INT_FIELDS += ("sp_max", "sp_epochs", "tc_n")   # probes: truth probe, TCAV
FLOAT_FIELDS += ("cl_temp", "hr_strength")
# patching page, DAS section: its link carries these while the section is open (das_on)
DAS_FIELDS = ("das_on", "das_task", "das_site", "das_layer", "das_pos", "das_dim", "das_bl", "das_steps", "das_n",
              "das_sweep", "das_sl", "das_sp", "das_ill")
INT_FIELDS += ("das_on", "das_layer", "das_pos", "das_dim", "das_bl", "das_steps", "das_n", "das_sweep", "das_ill")


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
    tau: str = ""           # ACDC's threshold τ ("" = 0.05)
    cview: str = ""         # "" the circuit graph, "ablations" its faithfulness table
    corruption: str = ""    # patching: "" token replacement (the pair), "gaussian" noise on the embeddings
    das_on: int = 0         # patching: 1 shows the DAS section (distributed alignment search)
    das_task: str = "ioi"   # DAS task: "ioi" or "country-capital"
    das_site: str = "resid_pre"   # resid_pre, mlp_post or attn_z
    das_layer: int = 20
    das_pos: int = -1       # token index (-1: last)
    das_dim: int = 1        # K
    das_bl: int = 0         # 1: boundless DAS
    das_steps: int = 100
    das_n: int = 48         # examples
    das_sweep: int = 0      # 1: show the layer x position IIA sweep
    das_sl: str = "12,16,20,24,28"   # sweep layers ("" = all)
    das_sp: str = ""        # sweep positions ("" = all)
    das_ill: int = 0        # 1: the illusion check of the open run
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
    snorm: int = 0          # 1: rescale steered activations to their own norms (GrAInS)
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
    # probes page (each study's own fields follow, prefixed by the study)
    study: str = "saplma"   # "saplma", "tcav", "clue" or "harm-refusal"
    cl_n: int = 48          # CLUE: the first N shipped problems
    cl_samples: int = 6     # CLUE: sampled traces per problem
    cl_temp: float = 1.0    # CLUE: sampling temperature
    cl_seed: int = 0        # CLUE: sampling seed (and the problem split)
    cl_layer: int = -1      # CLUE: the layer of the score histogram (-1: the rerank layer)
    hr_layer: int = -1      # harm-refusal: the layer of the two directions (-1: the middle layer)
    hr_strength: float = 4.0  # harm-refusal: steering strength (× the raw vector)
    hr_show: int = -1       # harm-refusal: the layer of the scatter (-1: the directions' layer)
    sp_layers: str = ""     # truth probe: blocks probed, comma list ("" = all)
    sp_max: int = 50        # truth probe: at most N true and N false per topic (0 = all)
    sp_epochs: int = 30     # truth probe: MLP epochs
    tc_concept: str = "water"   # TCAV: concept set (shipped name or file)
    tc_random: str = "random"   # TCAV: random pool
    tc_class: str = "sea"       # TCAV: class prompts
    tc_target: str = " sea"     # TCAV: target token
    tc_versus: str = ""         # TCAV: logit difference against this token ("" = none)
    tc_layers: str = "6,15,24"  # TCAV: layers tested (Bonferroni over them)
    tc_n: int = 20              # TCAV: random CAVs
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
        if value != "" and not (name in OPTIONAL_FLAGS and not value):
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
        if view.corruption:
            p["corruption"] = view.corruption
        if view.das_on:
            p.update({f: str(getattr(view, f)) for f in DAS_FIELDS})
        if view.atp:
            p["atp"] = "1"
    if view.key:
        p["key"] = view.key
    return p
