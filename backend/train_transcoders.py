"""Train a per-layer transcoder for every MLP of a model, offline, in one pass over the corpus.

    python -m backend train-transcoders --model smollm2-135m --tokens 3000000   # the shipped set
    python -m backend train-transcoders --tokens 20000 --width 256 --out /tmp/tc --layers 0,1

A transcoder of layer L reads the MLP's input (`blocks.L.mlp.hook_in`, the pre-MLP norm's
output) and predicts the MLP's output (`blocks.L.hook_mlp_out`) through d_tc sparse features
plus a linear skip W_skip x (Paulo et al. 2025: a skip connection lowers the error at no cost in
interpretability). They are the node vocabulary of attribution graphs (backend/transcoders.py).

Online, no activation cache: a transcoder set needs the input and output of every MLP, 69 kB
per token for SmolLM2 in float16, so a cache of a few million tokens would not fit on most
disks. Each batch of corpus windows (train split, seeded order, ~2 k tokens) runs through the
dense kernel once (kernels/forward.py, bulk precision; position 0 dropped: its massive
activations would eat the dictionary, as for the SAEs), and every layer's transcoder takes one
sparse BatchTopK step on it (kernels/transcoder_train.py; Adam, warm-up, linear decay over the
last fifth). The run checkpoints to its work folder and resumes from it; every `export_every`
seconds and at the end it writes the set in circuit-tracer's folder format (float16,
JumpReLU with the BatchTopK threshold), so an interrupted run still leaves a usable set.

Quality (backend/transcoders.py measures it, stored as quality.json): per layer the fraction of
variance unexplained, L0 and dead latents on held-out windows, and the replacement model's
fidelity (every MLP replaced, no error terms: KL and top-1 agreement with the real model).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import corpus, settings
from .errors import InvalidSpec


@dataclass(frozen=True)
class TCConfig:
    model: str = "smollm2-135m"
    layers: tuple[int, ...] | None = None   # None: every layer
    width: int = 2048                       # d_tc (float16: ~5.4 MB per SmolLM2 layer with the skip)
    k: int = 32                             # mean active features per token (BatchTopK)
    skip: bool = True
    tokens: int = 3_000_000                 # training tokens (positions >= 1)
    batch_tokens: int = 2048                # per step, all layers
    context: int = 128
    lr: float = 1e-3
    warmup: int = 100                       # steps
    decay_share: float = 0.2                # linear decay to 0 over the last share of steps
    aux_coefficient: float = 0.25
    bf16_skip: bool = True                  # the skip's dense products in bfloat16 on the CPU (3x)
    k_aux: int = 64                         # dead latents per row in the aux-k loss (SAELens: d_in / 2 =
                                            # 288 here; 64 costs a quarter and still revives them)
    dead_window: int = 50_000               # tokens without firing before the aux-k loss acts on a latent
    threshold_lr: float = 0.01              # EMA of the smallest kept activation (SAELens's BatchTopK)
    seed: int = 0
    corpus: str = corpus.DEFAULT_NAME
    precision: str | None = None            # dense-kernel precision; None: kernels.forward.bulk_precision()
    threads: int | None = None
    init_from: str | None = None            # warm start: a trained set's folder (its weights, fresh Adam,
                                            # a new warm-up; the corpus continues where that run stopped)

    def key(self) -> str:
        import hashlib

        d = {k: v for k, v in asdict(self).items()
             if k not in ("tokens", "threads", "precision", "k_aux", "bf16_skip") and not (k == "init_from" and v is None)}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def _windows(cfg: TCConfig, split: str, root=None):
    """The split's windows in a seeded order (never crossing a document)."""
    return corpus.pick_windows(cfg.model, split, cfg.context, order="seeded", seed=cfg.seed + (split == "heldout"),
                               name=cfg.corpus, root=root, sort=False)


def batches(cfg: TCConfig, split: str = "train", root=None, start_window: int = 0):
    """(next window index, ids [b T], mask [b T]) of consecutive windows, ~batch_tokens
    positions each, position 0 masked; cycles over the split (a new epoch reshuffles)."""
    wins = _windows(cfg, split, root)
    per = max(1, cfg.batch_tokens // cfg.context)
    i = start_window
    while True:
        epoch, j = divmod(i, len(wins))
        if epoch and j == 0:
            rng = np.random.default_rng(cfg.seed + 1000 * epoch)
            wins = [wins[t] for t in rng.permutation(len(wins))]
        chunk = wins[j:j + per]
        ids, mask = corpus.pad_right([w[2] for w in chunk])
        mask[:, 0] = False
        i += len(chunk)
        yield i, ids, mask


def points(layer: int) -> tuple[str, str]:
    """The transcoder's input and output hook points of a layer (kernels/forward.py names)."""
    return f"blocks.{layer}.mlp.hook_in", f"blocks.{layer}.hook_mlp_out"


def capture_io(dm, ids, mask, layers):
    """{layer: (x [n d], y [n d])} float32 at the unmasked positions, from one dense forward."""
    from kernels import forward as kf

    names = [p for layer in layers for p in points(layer)]
    got = kf.run(dm, ids, capture=names)
    m = mask.to(got[names[0]].device)
    return {layer: (got[points(layer)[0]][m].float(), got[points(layer)[1]][m].float()) for layer in layers}


@dataclass
class _LayerState:
    tc: object
    opt: torch.optim.Optimizer
    s_in: float
    s_out: float
    threshold: float
    since_fired: torch.Tensor               # tokens since each latent last fired
    history: list = field(default_factory=list)


def _lr(cfg: TCConfig, step: int, total: int) -> float:
    warm = min(1.0, (step + 1) / cfg.warmup)
    start = int(total * (1 - cfg.decay_share))
    decay = 1.0 if step < start else max(0.0, (total - step) / max(1, total - start))
    return cfg.lr * warm * decay


def _new_layer(cfg: TCConfig, layer: int, x, y, device) -> _LayerState:
    from kernels.transcoder_train import Transcoder

    g = torch.Generator().manual_seed(cfg.seed * 1000 + layer)
    tc = Transcoder(x.shape[1], y.shape[1], cfg.width, cfg.skip, generator=g, device=device)
    s_in = float((x.shape[1] / x.pow(2).sum(-1).mean()).sqrt())
    s_out = float((y.shape[1] / y.pow(2).sum(-1).mean()).sqrt())
    with torch.no_grad():
        tc.b_dec.copy_((y * s_out).mean(0))
    opt = torch.optim.Adam(tc.parameters(), lr=cfg.lr, betas=(0.9, 0.999), fused=True)
    return _LayerState(tc, opt, s_in, s_out, -1.0, torch.zeros(cfg.width, dtype=torch.long, device=device))


def _warm_layer(cfg: TCConfig, layer: int, x, y, device, folder: Path) -> _LayerState:
    """A layer state whose weights come from a trained set (circuit-tracer format, scales folded
    in): the same normalisation scales are measured on this batch and unfolded again."""
    from safetensors.torch import load_file

    st = _new_layer(cfg, layer, x, y, device)
    t = {k: v.float().to(device) for k, v in load_file(str(folder / f"layer_{layer}.safetensors")).items()}
    if t["W_enc"].shape != st.tc.W_enc.shape or ("W_skip" in t) != (st.tc.W_skip is not None):
        raise InvalidSpec(f"--init-from {folder}: layer {layer} has W_enc {tuple(t['W_enc'].shape)}"
                          f"{' with' if 'W_skip' in t else ' without'} a skip; this run wants "
                          f"{tuple(st.tc.W_enc.shape)}{' with' if cfg.skip else ' without'}")
    tc = st.tc
    with torch.no_grad():
        tc.W_enc.copy_(t["W_enc"] / st.s_in)
        tc.b_enc.copy_(t["b_enc"])
        tc.W_dec.copy_(t["W_dec"] * st.s_out)
        tc.b_dec.copy_(t["b_dec"] * st.s_out)
        if tc.W_skip is not None:
            tc.W_skip.copy_(t["W_skip"] * (st.s_out / st.s_in))
    st.opt = torch.optim.Adam(tc.parameters(), lr=cfg.lr, betas=(0.9, 0.999), fused=True)
    st.threshold = float(t["activation_function.threshold"].max())
    return st


def _step_layer(cfg: TCConfig, st: _LayerState, x, y, lr: float) -> dict:
    from kernels.transcoder_train import choose, sparse_step

    x, y = x * st.s_in, y * st.s_out
    dead = st.since_fired >= cfg.dead_window
    n_dead = int(dead.sum())
    chosen, aux = choose(st.tc, x, cfg.k, dead if n_dead else None, cfg.k_aux)
    st.tc.zero_grad(set_to_none=True)
    out = sparse_step(st.tc, x, y, chosen, aux, n_dead, cfg.aux_coefficient,
                      skip_dtype=torch.bfloat16 if x.device.type == "cpu" and cfg.bf16_skip else None)
    for g in st.opt.param_groups:
        g["lr"] = lr
    st.opt.step()
    fired = torch.zeros(cfg.width, dtype=torch.bool, device=x.device)
    fired[chosen.cols] = True
    st.since_fired += len(x)
    st.since_fired[fired] = 0
    low = float(out["acts"].min()) if len(out["acts"]) else 0.0
    st.threshold = low if st.threshold < 0 else (1 - cfg.threshold_lr) * st.threshold + cfg.threshold_lr * low
    var = float((y - y.mean(0)).pow(2).sum(-1).mean())
    return {"fvu": out["mse"] / var if var else 0.0, "l0": len(chosen.rows) / len(x), "dead": n_dead}


def export(cfg: TCConfig, states: dict[int, _LayerState], out: Path, n_layers: int, tokens: int) -> Path:
    """The set in circuit-tracer's folder format: layer_{i}.safetensors (float16; W_enc and W_dec
    [d_tc d_model], b_enc, b_dec, W_skip [d_model d_model], activation_function.threshold) and
    config.yaml; the normalisation scales folded into the weights. Written to a temporary
    folder and renamed, so a reader never sees half a set."""
    from safetensors.torch import save_file

    from .transcoders import stamp, write_config

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    for layer, st in states.items():
        tc = st.tc
        with torch.no_grad():
            t = {"W_enc": tc.W_enc * st.s_in, "b_enc": tc.b_enc.clone(), "W_dec": tc.W_dec / st.s_out,
                 "b_dec": tc.b_dec / st.s_out,
                 "activation_function.threshold": torch.full((cfg.width,), max(st.threshold, 0.0))}
            if tc.W_skip is not None:
                t["W_skip"] = tc.W_skip * (st.s_in / st.s_out)
        save_file({k: v.detach().to("cpu", torch.float16).contiguous() for k, v in t.items()},
                  str(tmp / f"layer_{layer}.safetensors"))
    write_config(tmp, cfg.model, n_layers, extra={"d_transcoder": cfg.width, "k": cfg.k, "skip": cfg.skip,
                                                  "training_tokens": tokens, "train_config": asdict(cfg)})
    stamp(tmp)
    import shutil

    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)           # its quality.json measured the old weights: it goes with them
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def calibrate(folder: Path, k: int, windows: int = 48, split: str = "train", log=None) -> list[float]:
    """Set every layer's JumpReLU threshold so that the set keeps, over `windows` corpus windows
    (positions >= 1), exactly the n*k largest pre-activations of each layer: BatchTopK's choice
    on one large batch, which is what the stored JumpReLU stands for. The running mean of the
    training batches' smallest kept value drifts while the encoder learns; this fixes the mean
    L0 at k. Rewrites the layer files in place (float16); returns the thresholds."""
    from safetensors.torch import load_file, save_file

    from kernels import forward as kf

    from . import transcoders as tcs
    from .model import load_model

    cfgd = tcs._read_config(Path(folder))
    model = load_model(cfgd.get("dashboard_model"))
    dm = kf.dense_model(model)
    files = sorted(Path(folder).glob("layer_*.safetensors"), key=lambda f: int(f.stem.split("_")[1]))
    layers = [int(f.stem.split("_")[1]) for f in files]
    wins = _windows(TCConfig(model=cfgd.get("dashboard_model")), split)[-windows:]
    xs: dict[int, list] = {l: [] for l in layers}
    for i in range(0, len(wins), 8):
        ids, mask = corpus.pad_right([w[2] for w in wins[i:i + 8]])
        mask[:, 0] = False
        for l, (x, _) in capture_io(dm, ids, mask, layers).items():
            xs[l].append(x)
    out = []
    for f, l in zip(files, layers):
        t = load_file(str(f))
        x = torch.cat(xs[l])
        pre = (x @ t["W_enc"].float().t() + t["b_enc"].float()).flatten()
        theta = float(pre.topk(len(x) * k).values[-1].clamp(min=0))
        t["activation_function.threshold"] = torch.full_like(t["b_enc"], theta)
        save_file({n: v.half().contiguous() for n, v in t.items()}, str(f))
        out.append(theta)
    tcs.stamp(Path(folder))
    if log:
        log(f"thresholds calibrated on {sum(len(torch.cat(v)) for v in xs.values()) // len(layers)} tokens")
    return out


def train(cfg: TCConfig, out: Path, work: Path, export_every: float = 900.0, log=None,
          deadline: float | None = None) -> dict:
    """Train (or resume) the set; returns a summary. log(str) gets progress lines. With a
    deadline (a time.time() value) the number of steps is re-estimated from the measured rate
    every 20 steps, so that the learning-rate decay ends by then (at most cfg.tokens)."""
    from kernels import forward as kf

    from .model import load_model

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = load_model(cfg.model)
    n_layers = model.info.n_layers
    layers = list(cfg.layers) if cfg.layers is not None else list(range(n_layers))
    if not layers or any(not 0 <= l < n_layers for l in layers):
        raise InvalidSpec(f"layers must lie in 0–{n_layers - 1}")
    precision = cfg.precision or kf.bulk_precision()
    dm = kf.dense_model(model, *kf.PRECISIONS[precision])
    if dm is None:
        raise InvalidSpec(f"{cfg.model}: transcoder training needs the dense kernel (Llama-style or Gemma-3)")
    device = settings.device()
    total = max(1, cfg.tokens // cfg.batch_tokens)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / f"ckpt-{cfg.key()}.pt"
    states: dict[int, _LayerState] = {}
    step, window, tokens = 0, 0, 0
    if ckpt.exists():
        saved = torch.load(ckpt, weights_only=False)
        step, window, tokens = saved["step"], saved["window"], saved["tokens"]
        from kernels.transcoder_train import Transcoder

        for layer, s in saved["layers"].items():
            tc = Transcoder(s["d_in"], s["d_out"], cfg.width, cfg.skip, device=device)
            tc.load_state_dict(s["tc"])
            opt = torch.optim.Adam(tc.parameters(), lr=cfg.lr, fused=True)
            opt.load_state_dict(s["opt"])
            states[layer] = _LayerState(tc, opt, s["s_in"], s["s_out"], s["threshold"], s["since_fired"].to(device))
        log(f"resumed at step {step} ({tokens} tokens)")
    init, before = None, int(saved.get("before", 0)) if ckpt.exists() else 0
    if cfg.init_from and not ckpt.exists():
        from . import transcoders as tcs

        init = tcs.resolve(cfg.init_from)
        before = int(tcs._read_config(init).get("training_tokens") or 0)
        # continue on windows the warm set has not seen (one epoch of the split is ~10 M tokens)
        window = before // (cfg.context - 1)
        log(f"warm start from {init} ({before} tokens); corpus from window {window}")
    t0, last_export, rate_t, rate_n = time.time(), time.time(), time.time(), 0
    stats: dict[int, dict] = {}

    def save():
        torch.save({"step": step, "window": window, "tokens": tokens, "before": before,
                    "layers": {l: {"tc": s.tc.state_dict(), "opt": s.opt.state_dict(), "s_in": s.s_in,
                                   "s_out": s.s_out, "threshold": s.threshold, "since_fired": s.since_fired.cpu(),
                                   "d_in": s.tc.W_enc.shape[1], "d_out": s.tc.W_dec.shape[1]}
                               for l, s in states.items()}}, ckpt.with_suffix(".tmp"))
        ckpt.with_suffix(".tmp").replace(ckpt)

    for window, ids, mask in batches(cfg, start_window=window):
        if step >= total:
            break
        io = capture_io(dm, ids, mask, layers)
        lr = _lr(cfg, step, total)
        for layer in layers:
            x, y = (t.to(device) for t in io[layer])
            if layer not in states:
                states[layer] = (_warm_layer(cfg, layer, x, y, device, init) if init is not None
                                 else _new_layer(cfg, layer, x, y, device))
            stats[layer] = _step_layer(cfg, states[layer], x, y, lr)
        step += 1
        n = int(mask.sum())
        tokens += n
        rate_n += n
        if step % 20 == 0 or step == total:
            fv = [stats[l]["fvu"] for l in layers]
            log(f"step {step}/{total} tokens {tokens} {rate_n / (time.time() - rate_t):.0f} tok/s "
                f"fvu median {np.median(fv):.3f} max {max(fv):.3f} (L{layers[int(np.argmax(fv))]}) "
                f"l0 {np.mean([stats[l]['l0'] for l in layers]):.1f} "
                f"dead {sum(stats[l]['dead'] for l in layers)}")
            if deadline is not None:
                per_step = (time.time() - rate_t) / 20
                # past the deadline nothing is left (max 0): the decay has ended, the run stops
                total = min(max(1, cfg.tokens // cfg.batch_tokens), step + max(0, int((deadline - time.time()) / per_step)))
            rate_t, rate_n = time.time(), 0
        if time.time() - last_export > export_every:
            save()
            export(cfg, states, out, max(layers) + 1, before + tokens)
            last_export = time.time()
            log(f"checkpoint and export at step {step}")
    save()
    export(cfg, states, out, max(layers) + 1, before + tokens)
    return {"path": str(out), "steps": step, "tokens": tokens, "seconds": round(time.time() - t0, 1),
            "layers": layers, "train_fvu": {l: round(stats[l]["fvu"], 4) for l in stats}}


# -- quality (quality.json beside the weights) ------------------------------------------------------------------------------
def replacement_hooks(tset, layers, first: int = 1) -> dict:
    """Dense-kernel hooks that replace each MLP's output by its transcoder's (no error term) at
    positions >= first (first = 0: every position)."""
    hooks, held = {}, {}
    for layer in layers:
        pin, pout = points(layer)

        def keep(x, layer=layer):
            held[layer] = x

        def swap(y, layer=layer):
            y = y.clone()
            y[:, first:] = tset.forward(layer, held[layer][:, first:].float()).to(y.dtype)
            return y
        hooks[pin], hooks[pout] = keep, swap
    return hooks


def _fidelity(dm, tset, seqs: list[list[int]], first: int) -> dict:
    """KL(real || replacement) per token (nats, mean) and top-1 agreement at positions >= 1."""
    from kernels import forward as kf

    from .corpus import pad_right

    kl_sum = agree = n = 0.0
    loss_real = loss_rep = 0.0
    hooks = replacement_hooks(tset, range(tset.n_layers), first)
    for i in range(0, len(seqs), 8):
        ids, mask = pad_right(seqs[i:i + 8])
        mask[:, 0] = False
        real = kf.run(dm, ids, capture=[kf.FINAL])[kf.FINAL]
        rep = kf.run(dm, ids, capture=[kf.FINAL], hooks=hooks)[kf.FINAL]
        lr, lp = (dm.logits(x.float()).float().log_softmax(-1) for x in (real, rep))
        m = mask
        kl = (lr.exp() * (lr - lp)).sum(-1)
        kl_sum += float(kl[m].sum())
        agree += float((lr.argmax(-1) == lp.argmax(-1))[m].sum())
        n += float(m.sum())
        nxt = torch.zeros_like(mask)
        nxt[:, :-1] = mask[:, 1:]
        tgt = ids[:, 1:]
        loss_real += float(-lr[:, :-1].gather(-1, tgt[..., None])[..., 0][nxt[:, :-1]].sum())
        loss_rep += float(-lp[:, :-1].gather(-1, tgt[..., None])[..., 0][nxt[:, :-1]].sum())
    ntgt = max(1.0, n - len(seqs))
    return {"kl": round(kl_sum / n, 4), "top1_agreement": round(agree / n, 4), "tokens": int(n),
            "loss_real": round(loss_real / ntgt, 4), "loss_replacement": round(loss_rep / ntgt, 4)}


def measure_quality(folder: Path, windows: int = 64, log=None) -> dict:
    """Per-layer FVU (1 - explained variance of the MLP output), L0 and dead latents on held-out
    corpus windows (positions >= 1), and the replacement model's fidelity on them and on the
    project's test passages; written to quality.json beside the weights."""
    from kernels import forward as kf

    from . import transcoders as tcs
    from .model import load_model
    from .train_sae import passages

    log = log or (lambda m: None)
    t0 = time.time()
    folder = Path(folder)
    cfg = tcs._read_config(folder)
    model_id = cfg.get("dashboard_model")
    model = load_model(model_id)
    tset = tcs.load_set(str(folder), n_layers=None)
    tcs.forget(folder)                     # the measured weights may change later
    dm = kf.dense_model(model)
    wins = _windows(TCConfig(model=model_id), "heldout")[:windows]
    seqs = [w[2] for w in wins]
    layers = range(tset.n_layers)
    sse = np.zeros(tset.n_layers); sst = np.zeros(tset.n_layers); l0 = np.zeros(tset.n_layers)
    fired = torch.zeros(tset.n_layers, tset.d_transcoder, dtype=torch.bool)
    sums = [[] for _ in layers]
    n = 0
    for i in range(0, len(seqs), 8):
        ids, mask = corpus.pad_right(seqs[i:i + 8])
        mask[:, 0] = False
        io = capture_io(dm, ids, mask, layers)
        for layer in layers:
            x, y = io[layer]
            a = tset.encode(layer, x)
            rec = tset.decode(layer, a, x)
            sse[layer] += float((rec - y).pow(2).sum())
            sums[layer].append(y)
            l0[layer] += float((a > 0).sum())
            fired[layer] |= (a > 0).any(0).cpu()
        n += int(mask.sum())
    for layer in layers:
        y = torch.cat(sums[layer])
        sst[layer] = float((y - y.mean(0)).pow(2).sum())
    log(f"per-layer quality on {n} held-out tokens in {time.time() - t0:.0f} s")
    per = [{"layer": l, "fvu": round(float(sse[l] / sst[l]), 4), "l0": round(float(l0[l] / n), 2),
            "dead_pct": round(100 * float(1 - fired[l].float().mean()), 2)} for l in layers]
    tok = model.tokenizer
    bos = [tok.bos_token_id] if model.info.prepend_bos and tok.bos_token_id is not None else []
    texts = passages()
    pseqs = [bos + tok(t, add_special_tokens=False)["input_ids"][:255] for t in texts.values()]
    fid = {"heldout": {"positions_ge_1": _fidelity(dm, tset, seqs, 1), "all_positions": _fidelity(dm, tset, seqs, 0)},
           "passages": {"positions_ge_1": _fidelity(dm, tset, pseqs, 1), "all_positions": _fidelity(dm, tset, pseqs, 0)},
           "note": "every MLP replaced by its transcoder at once, no error terms; KL(real || replacement) "
                   "in nats per token and top-1 agreement at positions >= 1; positions_ge_1 keeps the first "
                   "token's MLPs exact (its massive activations are not in the training data)"}
    q = {"layers": per, "fidelity": fid, "heldout_tokens": n, "seconds": round(time.time() - t0, 1)}
    (folder / "quality.json").write_text(json.dumps(q, indent=1))
    return q


def add_cli_args(p) -> None:
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layers", default=None, help="comma-separated (default: every layer)")
    p.add_argument("--width", type=int, default=TCConfig.width)
    p.add_argument("--k", type=int, default=TCConfig.k)
    p.add_argument("--no-skip", action="store_true")
    p.add_argument("--tokens", type=int, default=TCConfig.tokens)
    p.add_argument("--lr", type=float, default=TCConfig.lr)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="folder of the set (default data/transcoders/<model>-plt)")
    p.add_argument("--work", default=None, help="checkpoints (default ~/.cache/interp-dashboard/transcoders)")
    p.add_argument("--export-every", type=float, default=900.0, help="seconds between exports")
    p.add_argument("--hours", type=float, default=None,
                   help="finish (learning-rate decay included) within this many hours, at most --tokens")
    p.add_argument("--init-from", default=None, metavar="SET",
                   help="warm start from a trained set (its id or folder): its weights, a fresh optimiser and "
                        "warm-up, the corpus continuing after the windows it trained on")
    p.add_argument("--no-quality", action="store_true", help="skip the quality measurement at the end")
    p.add_argument("--measure-only", default=None, metavar="SET",
                   help="train nothing: measure (and write quality.json of) this set")


def run_cli(a) -> dict:
    from . import transcoders

    if a.measure_only:
        return measure_quality(transcoders.resolve(a.measure_only), log=lambda m: print(m, file=sys.stderr))
    layers = tuple(int(x) for x in a.layers.split(",")) if a.layers else None
    cfg = TCConfig(model=a.model, layers=layers, width=a.width, k=a.k, skip=not a.no_skip, tokens=a.tokens,
                   lr=a.lr, threads=a.threads, init_from=a.init_from)
    out = Path(a.out) if a.out else transcoders.TRANSCODER_DIR / transcoders.default_set_id(a.model)
    work = Path(a.work) if a.work else settings.cache_dir() / "transcoders"
    summary = train(cfg, out, work, a.export_every,
                    deadline=time.time() + a.hours * 3600 if a.hours else None)
    summary["thresholds"] = calibrate(out, cfg.k, log=lambda m: print(m, file=sys.stderr, flush=True))
    if not a.no_quality:
        summary["quality"] = measure_quality(out, log=lambda m: print(m, file=sys.stderr, flush=True))
    return summary
