"""Transcoders with and without the skip connection: the same layers, data, steps and seed;
held-out FVU and L0 per layer (the README's "The skip connection, measured").

    python benchmarks/transcoder_skip.py [TOKENS] [OUT_DIR]     # default 400000 tokens, a temp dir

Needs the default corpus (`python -m backend corpus build`). ~20 min per variant on two cores.
"""
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import numpy as np, torch
from safetensors.torch import load_file
from backend import corpus
from backend.train_transcoders import TCConfig, train, calibrate, capture_io, _windows
from backend.model import load_model
from kernels import forward as kf

LAYERS = (4, 11, 20)
TOKENS = int(sys.argv[1]) if len(sys.argv) > 1 else 400_000
ROOT = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(tempfile.mkdtemp(prefix="tc-skip-"))
res = {}
for skip in (True, False):
    cfg = TCConfig(layers=LAYERS, skip=skip, tokens=TOKENS, threads=2)
    out = ROOT / (f"set_{'skip' if skip else 'noskip'}")
    s = train(cfg, out, ROOT / "work", export_every=1e9)
    calibrate(out, cfg.k, log=lambda m: None)
    res[skip] = {"train": s}
model = load_model("smollm2-135m")
dm = kf.dense_model(model)
wins = _windows(TCConfig(), "heldout")[:32]
seqs = [w[2] for w in wins]
for skip in (True, False):
    out = ROOT / (f"set_{'skip' if skip else 'noskip'}")
    sse = {l: 0.0 for l in LAYERS}; ys = {l: [] for l in LAYERS}; l0 = {l: 0.0 for l in LAYERS}; n = 0
    W = {l: {k: v.float() for k, v in load_file(str(out / f"layer_{l}.safetensors")).items()} for l in LAYERS}
    for i in range(0, len(seqs), 8):
        ids, mask = corpus.pad_right(seqs[i:i + 8]); mask[:, 0] = False
        io = capture_io(dm, ids, mask, LAYERS)
        for l in LAYERS:
            x, y = io[l]; w = W[l]
            pre = x @ w["W_enc"].T + w["b_enc"]
            a = torch.where(pre > w["activation_function.threshold"], pre, torch.zeros_like(pre))
            rec = a @ w["W_dec"] + w["b_dec"] + (x @ w["W_skip"].T if "W_skip" in w else 0)
            sse[l] += float((rec - y).pow(2).sum()); ys[l].append(y); l0[l] += float((a > 0).sum())
        n += int(mask.sum())
    fvu = {}
    for l in LAYERS:
        y = torch.cat(ys[l]); fvu[l] = sse[l] / float((y - y.mean(0)).pow(2).sum())
    res[skip]["heldout_fvu"] = {l: round(fvu[l], 4) for l in LAYERS}
    res[skip]["l0"] = {l: round(l0[l] / n, 1) for l in LAYERS}
    res[skip]["heldout_tokens"] = n
print(json.dumps({("skip" if k else "noskip"): v for k, v in res.items()}, indent=1))
