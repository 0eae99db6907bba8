"""Command line over the same calls the dashboard makes.

    python -m backend prompt --model smollm2-135m --text "The capital of France is" --format json
    python -m backend prompt --model ./my-checkpoint --text "..."     (any Hugging Face folder)
    python -m backend models --format json

Errors print {"error": {"type", "code", "message"}} (json) or a message (text), exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from typing import Any, Callable

from .errors import DashboardError
from .model import DEFAULT_MODEL

def _outcome_fields(out) -> dict[str, Any]:
    return {"run_key": out.run_key, "from_store": out.from_store,
            "compute_seconds": round(out.compute_seconds, 4),
            "read_seconds": round(out.read_seconds, 4)}


def _add_prompt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--text", required=True)
    p.add_argument("--top-k", type=int, default=10)


def _run_prompt(a: argparse.Namespace) -> dict:
    from . import PromptSpec, run

    out = run(PromptSpec(model=a.model, text=a.text, top_k=a.top_k), progress=_log)
    r = out.result
    return {**_outcome_fields(out), "model": out.spec.model, "text": a.text, "tokens": r.tokens,
            "token_ids": r.token_ids,
            "top_k": [{"token": t, "prob": float(p), "token_id": int(i)}
                      for t, p, i in zip(r.top_tokens, r.top_probs, r.top_ids)],
            "logit_lens_top": [[row[pos][0] for pos in range(len(r.tokens))]
                               for row in r.lens_tokens.tolist()]}


def _add_models(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", nargs="?", choices=["list", "add", "remove"], default="list",
                   help="list (default); add PATH: register a local checkpoint folder (kept beside the store); "
                        "remove PATH: forget one. DASHBOARD_MODELS lists more (os.pathsep-separated)")
    p.add_argument("path", nargs="?", default=None, help="a Hugging Face checkpoint folder (add / remove)")


def _run_models(a: argparse.Namespace) -> dict:
    from . import settings
    from .errors import InvalidSpec
    from .model import available_models, local_models, register, unregister

    if a.action in ("add", "remove") and not a.path:
        raise InvalidSpec(f"`models {a.action}` needs the folder: python -m backend models {a.action} PATH")
    out: dict[str, Any] = {}
    if a.action == "add":
        out["added"] = register(a.path)
    elif a.action == "remove":
        out["removed"] = unregister(a.path)
    elif a.path:
        raise InvalidSpec("`models` takes a folder only with add or remove.")
    return {**out, "default": DEFAULT_MODEL, "offline": available_models(), "local": local_models(),
            "registry": str(settings.registered_models_file()),
            "hub": "any TransformerLens model name or Hugging Face repo id, when online",
            "any_folder": "--model PATH opens any Hugging Face checkpoint folder, registered or not"}


# name -> (help, add-arguments, run); the last two are functions or "module:function" strings,
# imported only when that subcommand runs (so `python -m backend prompt` never imports SAELens).
SUBCOMMANDS: dict[str, tuple[str, Callable | str, Callable | str]] = {
    "prompt": ("tokens, top next tokens and logit lens of a prompt", _add_prompt, _run_prompt),
    "models": ("models available offline and local checkpoint folders registered (models add PATH)",
               _add_models, _run_models),
    "corpus": ("build (from installed packages) or describe the text corpus",
              "backend.corpus:add_cli_args", "backend.corpus:run_cli"),
    "train-sae": ("train the SAEs offline (one activation cache, SAELens SAETrainer)",
                 "backend.train_sae:add_cli_args", "backend.train_sae:run_cli"),
    "train-transcoders": ("train a per-layer transcoder for every MLP (online, resumable; circuit-tracer format)",
                          "backend.train_transcoders:add_cli_args", "backend.train_transcoders:run_cli"),
    "transcoders": ("transcoder sets available (shipped) with per-layer quality and replacement fidelity",
                    "backend.transcoders:add_cli_args", "backend.transcoders:run_cli"),
    "graph": ("attribution graph of a prompt's next token: transcoder features, errors, tokens, logits; pruned, scored",
              "backend.analyses.graph:add_cli_args", "backend.analyses.graph:run_cli"),
    "graph-intervene": ("switch transcoder features off / scale / set them and see the next-token prediction change",
                        "backend.analyses.graph_intervention:add_cli_args", "backend.analyses.graph_intervention:run_cli"),
    "saes": ("SAEs available (shipped) with hook names, widths and quality",
            "backend.saes:add_cli_args", "backend.saes:run_cli"),
    "features": ("SAE features of a prompt: top latents per token, reconstruction error",
                "backend.analyses.features:add_cli_args", "backend.analyses.features:run_cli"),
    "massive": ("massive activations of a prompt: top |values| per layer vs the median, sinks",
               "backend.analyses.massive:add_cli_args", "backend.analyses.massive:run_cli"),
    "massive-ablation": ("zero / mean ablation of the massive activations: LM loss on texts",
                        "backend.analyses.massive:add_ablation_cli_args", "backend.analyses.massive:run_ablation_cli"),
    "patch": ("exact activation patching sweep (layers x positions / heads) of a prompt pair",
             "backend.analyses.patching:add_patch_args", "backend.analyses.patching:run_cli"),
    "attribute": ("which input tokens made this output: saliency, input x gradient, integrated gradients (auto steps)",
                  "backend.analyses.token_attribution:add_cli_args", "backend.analyses.token_attribution:run_cli"),
    "das": ("distributed alignment search: learn a K-dim subspace at a site whose interchange makes the model follow a causal variable",
            "backend.analyses.das:add_cli_args", "backend.analyses.das:run_cli"),
    "illusion": ("the subspace-patching illusion check of a 1-D direction: rowspace vs nullspace of the next weights",
                 "backend.analyses.illusion:add_cli_args", "backend.analyses.illusion:run_cli"),
    "probe-study": ("what the hidden states know: truth probe (SAPLMA), TCAV, CLUE verification, harmfulness vs refusal",
                    "backend.analyses.probe_study:add_cli_args", "backend.analyses.probe_study:run_cli"),
    "atp": ("attribution patching (AtP): gradient estimate of the patching sweep, ~3 forwards",
           "backend.analyses.attribution:add_cli_args", "backend.analyses.attribution:run_cli"),
    "atp-star": ("AtP* (QK fix + GradDrop) beside plain AtP; false negatives vs a stored exact sweep",
                 "backend.analyses.atp_star:add_cli_args", "backend.analyses.atp_star:run_cli"),
    "neurons": ("MLP neurons of a prompt: top neurons per token at a layer; --neuron N: logit effect",
               "backend.analyses.neurons:add_cli_args", "backend.analyses.neurons:run_cli"),
    "graph-corpus": ("attribution graphs of many corpus prompts (resumable job): which prompts each transcoder "
                     "feature carries an answer in", "backend.jobs.graph_corpus:add_cli_args",
                     "backend.jobs.graph_corpus:run_cli"),
    "neuron-stats": ("corpus statistics of every MLP neuron (resumable job): frequency, dead, detectors",
                     "backend.jobs.neuron_stats:add_cli_args", "backend.jobs.neuron_stats:run_cli"),
    "massive-corpus": ("massive activations over corpus windows (resumable job) and the zero/mean ablation",
                       "backend.jobs.massive_corpus:add_cli_args", "backend.jobs.massive_corpus:run_cli"),
    "feature-index": ("encode corpus windows with SAEs (one forward for all) into the feature index (resumable)",
                      "backend.jobs.features.cli:add_index_args", "backend.jobs.features.cli:run_index"),
    "feature-map": ("UMAP map of an SAE's decoder directions (cosine), stored and shipped beside the SAE",
                    "backend.jobs.features.cli:add_map_args", "backend.jobs.features.cli:run_map"),
    "feature-search": ("features by a token (top examples, logit effects) or by a text (most active)",
                       "backend.jobs.features.cli:add_search_args", "backend.jobs.features.cli:run_search"),
    "feature": ("a feature's dashboard from the index: top/quantile examples, histogram, logit effects, similar",
                "backend.jobs.features.cli:add_feature_args", "backend.jobs.features.cli:run_feature"),
    "feature-scores": ("VocabProj, TokenChange, input and output scores and a label for every SAE feature (resumable)",
                       "backend.jobs.features.cli:add_scores_args", "backend.jobs.features.cli:run_scores"),
    "circuit": ("edge-level circuit (EAP / EAP-IG scores, top-n edges) and its faithfulness, run exactly",
                "backend.analyses.circuits:add_cli_args", "backend.analyses.circuits:run_cli"),
    "export": ("take things out of the store: a result (JSON), a table (Parquet), a figure (HTML/PNG), a feature",
               "backend.export:add_cli_args", "backend.export:run_cli"),
    "direction": ("make a direction (diff-means, caa, actadd, probe, sae) at a site and layer; stored",
                  "backend.analyses.directions:add_cli_args", "backend.analyses.directions:run_cli"),
    "steer": ("generate with and without a direction (or SAE feature) added or ablated, side by side",
              "backend.analyses.steering:add_cli_args", "backend.analyses.steering:run_cli"),
}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr)


def _print_text(d: Any, indent: int = 0) -> None:
    pad = "  " * indent
    for k, v in d.items():
        if isinstance(v, dict):
            print(f"{pad}{k}:")
            _print_text(v, indent + 1)
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            print(f"{pad}{k}:")
            for item in v:
                print(pad + "  - " + ", ".join(f"{ik}={iv!r}" for ik, iv in item.items()))
        else:
            print(f"{pad}{k}: {v!r}")


def _resolve(fn: Callable | str) -> Callable:
    if callable(fn):
        return fn
    module, name = fn.split(":")
    return getattr(importlib.import_module(module), name)


def _parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m backend", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_, add, _) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_)
        if argv and argv[0] == name:  # only the chosen subcommand's module is imported
            _resolve(add)(p)
        if not any("--format" in act.option_strings for act in p._actions):   # a subcommand may widen it
            p.add_argument("--format", choices=["json", "text"], default="text")
    return parser


def execute(argv: list[str]) -> tuple[int, dict]:
    """Run one CLI call in this process: (0, payload) or (2, {"error": ...}). Used by `main` and
    by the dashboard's store server (backend/serve.py) for calls forwarded to it."""
    try:
        a = _parser(argv).parse_args(argv)
    except SystemExit as e:  # argparse already printed its usage message
        return 2, {"error": {"type": "UsageError", "code": "usage", "message": f"bad arguments (exit {e.code})"}}
    try:
        return 0, _resolve(SUBCOMMANDS[a.command][2])(a)
    except DashboardError as e:
        return 2, {"error": e.to_dict()}


def store_wait() -> float:
    """How long a command waits for a store another process holds without serving it (the
    moment between one command closing it and the next opening it): DASHBOARD_STORE_WAIT s."""
    import os

    try:
        return max(0.0, float(os.environ.get("DASHBOARD_STORE_WAIT", "120")))
    except ValueError:
        return 120.0


def _serve_opened(store) -> None:
    """The first command to open the store serves it to the commands started after it."""
    from . import serve

    if str(store.path) != ":memory:":
        serve.start(store.path, execute)


def _stop_signals() -> None:
    """SIGTERM ends a command as Ctrl-C does (KeyboardInterrupt: the running chunk's transaction
    rolls back, the store closes, exit 143), instead of killing it between two writes."""
    import signal

    def term(signum, frame):
        raise _Terminated()

    try:
        signal.signal(signal.SIGTERM, term)
    except ValueError:   # not the main thread (an embedding caller): leave signals alone
        pass


class _Terminated(KeyboardInterrupt):
    pass


def main(argv: list[str] | None = None) -> int:
    from . import store as store_mod

    argv = sys.argv[1:] if argv is None else argv
    a = _parser(argv).parse_args(argv)
    _stop_signals()
    if _serve_opened not in store_mod.on_open:
        store_mod.on_open.append(_serve_opened)
    ours = not store_mod.default_is_open()   # called in a process that holds the store already: leave it open
    try:
        return _main(a, argv)
    except KeyboardInterrupt as e:
        _log("Stopped." + (" (SIGTERM)" if isinstance(e, _Terminated) else ""))
        return 143 if isinstance(e, _Terminated) else 130
    finally:
        if ours:
            _release()


def _main(a, argv: list[str]) -> int:
    from . import serve, settings
    from .errors import StoreLocked

    deadline, told = time.monotonic() + store_wait(), False
    while True:
        try:
            payload, code = _resolve(SUBCOMMANDS[a.command][2])(a), 0
            break
        except StoreLocked as e:
            # Held by a dashboard or by another command: hand the call to it (backend/serve.py);
            # between two holders (one closing, none serving yet) wait and try again.
            try:
                if serve.holder(settings.store_path()) is not None:
                    if not told:
                        _log("The store is held by another process (a dashboard or a command): "
                             "running this call in its process…")
                        told = True
                    code, payload = serve.forward(argv, settings.store_path())
                    break
            except serve.Retry:
                pass
            except DashboardError as e2:
                return _fail(a, e2)
            if time.monotonic() > deadline:
                return _fail(a, e)
            if not told:
                _log(f"Waiting for the store (in use by another process; up to {store_wait():.0f} s, "
                     "DASHBOARD_STORE_WAIT)…")
                told = True
            time.sleep(0.25)
        except DashboardError as e:
            return _fail(a, e)
    if code != 0:
        err = payload.get("error", {})
        if a.format == "json":
            print(json.dumps({"error": err}))
        else:
            print(f"error ({err.get('type')}): {err.get('message')}", file=sys.stderr)
        return code
    if a.format == "json":
        print(json.dumps(payload, ensure_ascii=False))
    else:
        _print_text(payload)
    return 0


def _release() -> None:
    """Hand the store on: finish the calls forwarded to this process, stop serving, close."""
    from . import serve, store as store_mod

    try:
        serve.stop_when_idle()
    except KeyboardInterrupt:
        pass
    store_mod.close_default()


def _fail(a, e: DashboardError) -> int:
    if a.format == "json":
        print(json.dumps({"error": e.to_dict()}))
    else:
        print(f"error ({type(e).__name__}): {e}", file=sys.stderr)
    return 2
