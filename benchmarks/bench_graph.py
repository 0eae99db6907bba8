"""Attribution graph of one prompt: the project's kernel against circuit-tracer, side by side.

    CIRCUIT_TRACER_PYTHON=/path/to/ct-venv/bin/python .venv/bin/python benchmarks/bench_graph.py \
        [--transcoders smollm2-135m-plt] [--text "..."] [--threads 2]

Same model (the converted SmolLM2 checkpoint), same transcoders, same prompt tokens (BOS
included), same limits (max 10 logits, 0.95 probability, every active feature), same thread
count; each side in its own fresh process, one after the other, so peak RSS is each one's own.
Reports tokens, active features, seconds of the attribution (model loading excluded on both
sides), peak RSS, and the adjacency's agreement (max |A - B| / max |B|). One JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DEFAULT_TEXT = "The Eiffel Tower is in Paris, and the Colosseum is in"   # 16 tokens with BOS


def ours(a) -> None:
    """Child process: our graph; prints JSON."""
    import torch

    from backend import transcoders as tc
    from backend.analyses.graph import graph_ids
    from backend.model import load_model
    from kernels import graph as kg
    from kernels.patching import fast_model

    torch.set_num_threads(a.threads)
    m = load_model("smollm2-135m")
    tset = tc.load_set(a.transcoders)
    fm = fast_model(m)
    ids = graph_ids(m, a.text)
    t = time.time()
    with torch.inference_mode():
        gi = kg.graph_inputs(fm, ids)
        nodes = kg.active_nodes(tset, gi, fm.W_U, 10, 0.95)
        A = kg.adjacency(fm, gi, nodes, tset.W_skip)
    seconds = time.time() - t
    torch.save({"A": A, "ids": ids}, a.out)
    print(json.dumps({"seconds": round(seconds, 3), "n_active_features": len(nodes.layer), "tokens": len(ids),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--transcoders", default="smollm2-135m-plt")
    p.add_argument("--text", default=DEFAULT_TEXT)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", action="store_true")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    if a.child:
        return ours(a)
    import torch

    from backend import transcoders as tc
    from backend.model.loading import OFFLINE_MODELS, converted_dir

    tmp = Path(tempfile.mkdtemp())
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    r = subprocess.run([sys.executable, __file__, "--child", "--transcoders", a.transcoders, "--text", a.text,
                        "--threads", str(a.threads), "--out", str(tmp / "ours.pt")], capture_output=True, text=True, env=env)
    if r.returncode:
        sys.exit(r.stderr[-3000:])
    mine = json.loads(r.stdout.strip().splitlines()[-1])
    ids = torch.load(tmp / "ours.pt", weights_only=False)["ids"]
    result = {"text": a.text, "transcoders": a.transcoders, "threads": a.threads, "ours": mine}
    py = os.environ.get("CIRCUIT_TRACER_PYTHON")
    if py and Path(py).exists():
        r = subprocess.run([py, str(ROOT / "benchmarks" / "ct_graph_reference.py"), "--model-dir",
                            str(converted_dir(OFFLINE_MODELS["smollm2-135m"])), "--transcoders",
                            str(tc.resolve(a.transcoders)), "--ids", json.dumps(ids), "--threads", str(a.threads),
                            "--out", str(tmp / "ct.pt")], capture_output=True, text=True, env=env)
        if r.returncode:
            sys.exit(r.stderr[-3000:])
        ct = json.loads(r.stdout.strip().splitlines()[-1])
        A = torch.load(tmp / "ours.pt", weights_only=False)["A"]
        B = torch.load(str(tmp / "ct.pt") + ".plain.pt", weights_only=False)["adjacency_matrix"]
        result.update(circuit_tracer=ct, speedup=round(ct["seconds"] / mine["seconds"], 2),
                      memory_ratio=round(mine["peak_rss_mb"] / ct["peak_rss_mb"], 3),
                      max_rel_diff=float((A - B).abs().max() / B.abs().max()))
    else:
        result["circuit_tracer"] = "set CIRCUIT_TRACER_PYTHON (see benchmarks/ct_graph_reference.py)"
    print(json.dumps(result))


if __name__ == "__main__":
    main()
