"""circuit-tracer's attribution graph of a prompt, for comparison (run in circuit-tracer's own venv).

circuit-tracer 0.5.0 pins transformers <= 4.57.3, so it cannot live in the project's venv
(transformers 5.x). Make its venv once (FINDINGS.md):

    python3 -m venv /work/ct-venv
    /work/ct-venv/bin/pip install torch==2.13.0 && /work/ct-venv/bin/pip install circuit-tracer==0.5.0 nnsight==0.6.1

and point CIRCUIT_TRACER_PYTHON at its python. Then (the project's test and benchmark call it):

    $CIRCUIT_TRACER_PYTHON benchmarks/ct_graph_reference.py --model-dir DIR --transcoders SET_DIR \
        --ids '[1, 504, ...]' --max-logits 10 --desired-logit-prob 0.95 --out graph.pt

DIR is the project's converted checkpoint of the model (transformers 5.x wrote it); a copy is
patched for transformers 4.57, which reads it wrongly otherwise (rope_theta falls back to
10 000, logits off by up to 2.3): `rope_theta` from the config's rope parameters and
`tokenizer_class: PreTrainedTokenizerFast`. Prints one JSON line: seconds, peak RSS, sizes.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path


def patched_copy(model_dir: Path) -> Path:
    out = Path(tempfile.mkdtemp(prefix="ct-model-"))
    for f in model_dir.iterdir():
        if f.is_file():
            (out / f.name).symlink_to(f.resolve())
    cfg = json.loads((model_dir / "config.json").read_text())
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    cfg["rope_theta"] = float(cfg.get("rope_theta") or rope.get("rope_theta") or 100000.0)
    (out / "config.json").unlink()
    (out / "config.json").write_text(json.dumps(cfg))
    tc = model_dir / "tokenizer_config.json"
    if tc.exists():
        t = json.loads(tc.read_text())
        t["tokenizer_class"] = "PreTrainedTokenizerFast"
        (out / "tokenizer_config.json").unlink()
        (out / "tokenizer_config.json").write_text(json.dumps(t))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", required=True)
    p.add_argument("--transcoders", required=True)
    p.add_argument("--ids", required=True, help="token ids as JSON (BOS included)")
    p.add_argument("--max-logits", type=int, default=10)
    p.add_argument("--desired-logit-prob", type=float, default=0.95)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--backend", default="nnsight")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", required=True)
    a = p.parse_args()

    import torch
    import yaml
    from circuit_tracer import ReplacementModel, attribute
    from circuit_tracer.graph import compute_graph_scores
    from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set

    if a.threads:
        torch.set_num_threads(a.threads)
    folder = Path(a.transcoders)
    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    paths = {int(f.stem.split("_")[1]): str(f) for f in folder.glob("layer_*.safetensors")}
    t0 = time.time()
    tset = load_transcoder_set(paths, scan=cfg.get("scan", folder.name), feature_input_hook=cfg["feature_input_hook"],
                               feature_output_hook=cfg["feature_output_hook"], device=torch.device("cpu"),
                               dtype=torch.float32, lazy_encoder=False, lazy_decoder=False)
    model_dir = patched_copy(Path(a.model_dir))
    try:
        model = ReplacementModel.from_pretrained_and_transcoders(str(model_dir), tset, backend=a.backend,
                                                                 device=torch.device("cpu"), dtype=torch.float32)
        load_s = time.time() - t0
        ids = torch.tensor(json.loads(a.ids))
        t1 = time.time()
        graph = attribute(ids, model, max_n_logits=a.max_logits, desired_logit_prob=a.desired_logit_prob,
                          batch_size=a.batch_size)
        seconds = time.time() - t1
        graph.to_pt(a.out)
        # the same graph as plain tensors, readable without circuit-tracer installed
        torch.save({"adjacency_matrix": graph.adjacency_matrix, "active_features": graph.active_features,
                    "activation_values": graph.activation_values, "selected_features": graph.selected_features,
                    "logit_ids": torch.tensor([int(t.vocab_idx) for t in graph.logit_targets]),
                    "logit_probabilities": graph.logit_probabilities, "input_tokens": graph.input_tokens,
                    "scores": compute_graph_scores(graph)}, a.out + ".plain.pt")
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
    print(json.dumps({"seconds": round(seconds, 3), "load_seconds": round(load_s, 2),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                      "n_active_features": int(graph.active_features.shape[0]),
                      "n_nodes": int(graph.adjacency_matrix.shape[0]), "tokens": len(ids),
                      "logit_ids": [int(t.vocab_idx) for t in graph.logit_targets]}))


if __name__ == "__main__":
    main()
