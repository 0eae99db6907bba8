"""Train the project's SAEs offline: one activation cache, then SAELens's SAETrainer per SAE.

    python -m backend train-sae --model smollm2-135m            # the shipped set (see PLAN)
    python -m backend train-sae --sites resid_pre:15 --tokens 20000 --width 1024 --out /tmp/saes

1. Activations. Windows of the corpus's train split (never crossing a document) run through
   the model once, hooks at every site to train on, stopping after the deepest hooked block
   (run_with_hooks(stop_at_layer=...)). Position 0 of every window is dropped: the first
   token of a sequence carries the model's massive activations (|x| ~ 10^4 from layer 15 on,
   FINDINGS), which no reconstruction objective should spend latents on. The same position
   is left untouched when the SAE is spliced in for the CE metrics. Activations are kept as
   float16 shards in the cache directory, so an interrupted collection resumes shard-wise.
2. Training. Each SAE is a TopK SAE (k latents per token) trained with SAELens's SAETrainer
   over an iterator of activation batches drawn from the cache (seeded permutation per
   epoch). SAETrainer checkpoints (weights, optimiser, scheduler, sparsity counters) land in
   the work directory; a rerun resumes from the last one.
3. Quality, on held-out documents and on EVAL_TEXTS (short modern texts unlike the training
   mix), stored as quality.json beside the weights: L0, variance explained, CE loss clean /
   with the SAE spliced in / zero-ablated / mean-ablated, CE recovered (vs zero and vs
   mean), delta loss, dead and dense latent fractions. Weights are saved in SAELens's folder
   format in float16, and the metrics are measured with those float16 weights.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from . import corpus, settings
from .errors import InvalidSpec
from .sites import Component, Site, hook_name

SAE_DIR = settings.DATA_DIR / "saes"

# (component, layer) of the shipped SAEs of the default model: the residual stream early,
# middle and late, and the attention output (hook_z, heads concatenated) of layer 23, where
# the IOI name-mover head L23H3 sits.
PLAN = [(Component.RESID_PRE, 5), (Component.RESID_PRE, 15), (Component.RESID_PRE, 25),
        (Component.Z, 23)]

# Held-out text unlike the training mix (modern prose, dialogue, code, instructions), written
# for this project.
EVAL_TEXTS = [
    "The city council voted on Tuesday to extend the bike lane along Harbor Street by two "
    "miles. Supporters said the change would make the commute safer for students, while "
    "several shop owners worried that losing parking spaces would hurt their business. The "
    "project is expected to cost about four million dollars and should be finished next spring.",
    "Maya opened the fridge, stared at the empty shelves, and sighed. \"We're out of milk "
    "again,\" she called. Her brother looked up from his laptop. \"I'll go after this call, "
    "I promise.\" She didn't believe him, so she grabbed her keys and walked to the corner "
    "store herself. It was raining, of course, and she had forgotten her umbrella.",
    "def moving_average(values, window):\n    \"\"\"Return the moving average of a list.\"\"\"\n"
    "    if window <= 0:\n        raise ValueError(\"window must be positive\")\n    out = []\n"
    "    total = 0.0\n    for i, v in enumerate(values):\n        total += v\n"
    "        if i >= window:\n            total -= values[i - window]\n"
    "        out.append(total / min(i + 1, window))\n    return out\n",
    "To reset your password, open the settings page and choose Security. Enter your current "
    "password, then type the new one twice. If you no longer remember the old password, click "
    "the link in the email we sent you; it stays valid for thirty minutes. Contact support if "
    "the link has expired or the page shows an error.",
    "The Industrial Revolution began in Britain in the late eighteenth century. Steam engines, "
    "new machines for spinning and weaving, and cheaper iron changed how goods were made. "
    "Workers moved from farms to growing cities, where factories offered wages but long hours "
    "and dangerous conditions. Within a century, the same changes had spread across Europe "
    "and North America.",
    "Preheat the oven to 200 degrees. Cut the potatoes into thin slices, toss them with olive "
    "oil, salt and a little rosemary, and spread them on a baking tray. Bake for twenty-five "
    "minutes, turning them once, until they are golden and crisp at the edges. Serve warm with "
    "a green salad.",
    "Researchers trained a small neural network to predict the weather one day ahead. It was "
    "accurate on ordinary days, but it struggled with sudden storms, which were rare in the "
    "training data. The team now plans to add ten years of radar images and to test whether "
    "the model can warn farmers earlier.",
    "Dear Sam, thank you for the lovely birthday card! The party was small but fun: we played "
    "board games until midnight and ate far too much cake. I hope your new job is going well. "
    "Let me know when you are back in town so we can finally get that coffee. Love, Priya",
]


@dataclass(frozen=True)
class TrainConfig:
    model: str = "smollm2-135m"
    sites: tuple[tuple[str, int], ...] = tuple((c.value, layer) for c, layer in PLAN)
    corpus: str = corpus.DEFAULT_NAME
    train_tokens: int = 250_000       # unique activations cached for training (per site)
    heldout_tokens: int = 30_000      # held-out activations for L0 / VE / dead / dense
    ce_windows: int = 16              # held-out windows for the CE metrics
    context: int = 128
    width: int = 4608                 # d_sae
    k: int = 32
    epochs: float = 2.0
    batch: int = 512
    lr: float = 1e-3
    seed: int = 0
    dense_threshold: float = 0.1      # a latent firing on more than this share is "dense"
    eval_texts: int = len(EVAL_TEXTS)  # how many of EVAL_TEXTS the "unlike training" metrics use

    def cache_key(self) -> str:
        d = {k: getattr(self, k) for k in ("model", "sites", "corpus", "train_tokens",
                                            "heldout_tokens", "context", "seed")}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def sae_id(model: str, component: str, layer: int) -> str:
    return f"{model}-L{layer}-{component}"


# -- windows ------------------------------------------------------------------------------
def _sample_windows(cfg: TrainConfig, split: str, n_tokens: int, root=None) -> list[tuple[int, int, list[int]]]:
    wins = corpus.windows(cfg.model, split, cfg.context, cfg.corpus, root)
    order = np.random.default_rng(cfg.seed + (split == "heldout")).permutation(len(wins))
    out, total = [], 0
    for i in order:
        out.append(wins[i])
        total += len(wins[i][2]) - 1
        if total >= n_tokens:
            break
    return out


def _batches(windows, max_tokens: int = 2048):
    """Windows grouped by length into right-padded batches (pads only follow real tokens,
    and attention is causal, so they never change a real position)."""
    order = sorted(range(len(windows)), key=lambda i: len(windows[i][2]))
    cur: list[int] = []
    for i in order:
        if cur and (len(cur) + 1) * len(windows[i][2]) > max_tokens:
            yield cur
            cur = []
        cur.append(i)
    if cur:
        yield cur


def _pad(seqs: list[list[int]]):
    import torch

    t = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), t, dtype=torch.long)
    mask = torch.zeros(len(seqs), t, dtype=torch.bool)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.tensor(s)
        mask[r, :len(s)] = True
    return ids, mask


# -- activations --------------------------------------------------------------------------
def site_activations(model, sites: list[Site], ids):
    """Activations [batch pos d] at each site (hook_z flattened over heads), running the
    model only up to the deepest site's block."""
    import torch

    names = [hook_name(s) for s in sites]
    got: dict[str, torch.Tensor] = {}

    def keep(name):
        def fn(x, hook):
            got[name] = x.detach().flatten(2) if x.ndim == 4 else x.detach()
        return fn

    stop = max(s.layer for s in sites) + 1
    with model.lock, torch.inference_mode():
        model.bridge.run_with_hooks(ids, fwd_hooks=[(n, keep(n)) for n in names],
                                    stop_at_layer=min(stop, model.info.n_layers), return_type=None)
    return [got[n] for n in names]


def collect(model, cfg: TrainConfig, split: str, n_tokens: int, work: Path, root=None,
            progress: Callable[[str], None] | None = None) -> list[np.ndarray]:
    """float16 activations [n d] per site for positions >= 1 of sampled windows (cached)."""
    from tqdm import tqdm

    sites = [Site(Component(c), layer) for c, layer in cfg.sites]
    out_dir = work / f"acts-{split}"
    final = [out_dir / f"site{j}.npy" for j in range(len(sites))]
    if all(p.exists() for p in final):
        return [np.load(p, mmap_mode="r") for p in final]
    out_dir.mkdir(parents=True, exist_ok=True)
    wins = _sample_windows(cfg, split, n_tokens, root)
    batches = list(_batches(wins))
    bar = tqdm(total=sum(len(w[2]) - 1 for w in wins), desc=f"activations ({split})", unit="tok",
               file=sys.stderr, disable=progress is None)
    for b, idx in enumerate(batches):
        shard = out_dir / f"shard{b:05d}.npz"
        n = sum(len(wins[i][2]) - 1 for i in idx)
        if not shard.exists():
            ids, mask = _pad([wins[i][2] for i in idx])
            mask[:, 0] = False
            acts = site_activations(model, sites, ids)
            np.savez(shard.with_suffix(".tmp.npz"),
                     **{f"s{j}": a[mask].to("cpu").half().numpy() for j, a in enumerate(acts)})
            shard.with_suffix(".tmp.npz").replace(shard)
        bar.update(n)
    bar.close()
    for j, p in enumerate(final):
        parts = [np.load(out_dir / f"shard{b:05d}.npz")[f"s{j}"] for b in range(len(batches))]
        np.save(p, np.concatenate(parts))
    for b in range(len(batches)):
        (out_dir / f"shard{b:05d}.npz").unlink()
    return [np.load(p, mmap_mode="r") for p in final]


# -- training -----------------------------------------------------------------------------
class _Batches:
    """Infinite iterator of float32 batches from a float16 array, a seeded permutation per
    epoch; starts at a given sample (to resume a checkpoint on the same stream)."""

    def __init__(self, acts: np.ndarray, batch: int, seed: int, start_sample: int = 0):
        import torch

        self.acts = torch.from_numpy(np.array(acts))   # a writable copy of the (mmapped) cache
        self.batch, self.seed = batch, seed
        self.pos = start_sample // batch

    def __iter__(self):
        return self

    def __next__(self):
        import torch

        per_epoch = len(self.acts) // self.batch
        epoch, i = divmod(self.pos, per_epoch)
        if i == 0 or not hasattr(self, "_perm") or self._epoch != epoch:
            g = torch.Generator().manual_seed(self.seed * 1000 + epoch)
            self._perm, self._epoch = torch.randperm(len(self.acts), generator=g), epoch
        self.pos += 1
        return self.acts[self._perm[i * self.batch:(i + 1) * self.batch]].float()


def _training_sae(cfg: TrainConfig, component: str, layer: int, d_in: int):
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    meta = SAEMetadata(model_name=cfg.model, hook_name=hook_name(Site(Component(component), layer)),
                       context_size=cfg.context, prepend_bos=False, dataset_path=f"corpus:{cfg.corpus}")
    sae_cfg = TopKTrainingSAEConfig(d_in=d_in, d_sae=cfg.width, k=cfg.k, dtype="float32",
                                    device="cpu", normalize_activations="expected_average_only_in",
                                    reshape_activations="hook_z" if component == "z" else "none",
                                    aux_loss_coefficient=1.0 / 32, metadata=meta)
    return TopKTrainingSAE(sae_cfg)


def train_one(cfg: TrainConfig, component: str, layer: int, acts: np.ndarray, work: Path,
              progress: Callable[[str], None] | None = None):
    """Train one SAE from cached activations with SAETrainer; resume from its checkpoint."""
    import torch
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(cfg.seed)
    total = int(len(acts) * cfg.epochs) // cfg.batch * cfg.batch
    steps = total // cfg.batch
    hp = hashlib.sha256(json.dumps([cfg.width, cfg.k, cfg.epochs, cfg.batch, cfg.lr, cfg.seed]).encode())
    ckpt_root = work / f"ckpt-{component}-{layer}-{hp.hexdigest()[:8]}"   # resume only the same run
    tcfg = SAETrainerConfig(
        total_training_samples=total, train_batch_size_samples=cfg.batch, lr=cfg.lr,
        lr_end=cfg.lr / 10, lr_scheduler_name="constant", lr_warm_up_steps=max(1, steps // 20),
        lr_decay_steps=max(1, steps // 5), device="cpu", dead_feature_window=max(10, steps // 8),
        feature_sampling_window=max(10, steps // 4), n_checkpoints=4 if steps >= 40 else 0,
        checkpoint_path=str(ckpt_root), logger=LoggingConfig(log_to_wandb=False),
        n_batches_for_norm_estimate=min(50, max(1, len(acts) // cfg.batch)))
    sae = _training_sae(cfg, component, layer, acts.shape[1])
    start = 0
    done = sorted((p for p in ckpt_root.glob("*") if p.name.isdigit()), key=lambda p: int(p.name))
    if done:
        from safetensors.torch import load_file
        last = done[-1]
        sae.load_state_dict(load_file(str(last / "sae_weights.safetensors")), strict=False)
        start = -1
    trainer = SAETrainer(cfg=tcfg, sae=sae, data_provider=None)
    if start == -1:
        trainer.load_trainer_state(last)
        start = trainer.n_training_samples
        trainer.checkpoint_thresholds = [t for t in trainer.checkpoint_thresholds if t > start]
        if progress:
            progress(f"resuming {component}:{layer} at {start}/{total} samples from {last}")
    trainer.data_provider = _Batches(acts, cfg.batch, cfg.seed, start)
    return trainer.fit()


# -- quality ------------------------------------------------------------------------------
def _eval_sae(sae_dir: Path):
    from sae_lens import SAE

    sae = SAE.load_from_disk(str(sae_dir), device="cpu", dtype="float32").eval()
    if sae.cfg.reshape_activations == "hook_z":
        sae.turn_off_forward_pass_hook_z_reshaping()   # we pass heads flattened
    return sae


def activation_metrics(sae, acts: np.ndarray, dense_threshold: float, batch: int = 2048) -> dict:
    """L0, variance explained, dead and dense fractions on activations [n d] (flattened)."""
    import torch

    freq = torch.zeros(sae.cfg.d_sae)
    l0 = sse = 0.0
    n = len(acts)
    x_all = torch.from_numpy(np.array(acts)).float()
    mean = x_all.mean(0)
    sst = float(((x_all - mean) ** 2).sum())
    with torch.inference_mode():
        for i in range(0, n, batch):
            x = x_all[i:i + batch]
            f = sae.encode(x)
            rec = sae.decode(f)
            fired = f > 0
            freq += fired.float().sum(0)
            l0 += float(fired.sum())
            sse += float(((rec - x) ** 2).sum())
    freq /= n
    return {"tokens": n, "l0": l0 / n, "variance_explained": 1 - sse / sst,
            "dead_fraction": float((freq == 0).float().mean()),
            "dense_fraction": float((freq > dense_threshold).float().mean()),
            "mse_per_token": sse / n}


def ce_metrics(model, sae, site: Site, seqs: list[list[int]], mean_act,
               clean: float | None = None) -> dict:
    """Next-token CE loss clean, with the SAE spliced in, zero- and mean-ablated at the site
    (positions >= 1; position 0 keeps its activation), and the recovered fractions."""
    import torch

    name = hook_name(site)
    losses = {m: 0.0 for m in ("clean", "sae", "zero", "mean") if m != "clean" or clean is None}
    count = 0
    for idx in _batches([(0, 0, s) for s in seqs], max_tokens=1024):
        ids, mask = _pad([seqs[i] for i in idx])
        target_ok = mask[:, 1:]
        for mode in losses:
            def splice(x, hook, mode=mode):
                flat = x.flatten(2) if x.ndim == 4 else x
                if mode == "sae":
                    new = sae.decode(sae.encode(flat))
                elif mode == "zero":
                    new = torch.zeros_like(flat)
                else:
                    new = mean_act.to(flat.dtype).expand_as(flat)
                out = flat.clone()
                out[:, 1:] = new[:, 1:]
                return out.reshape(x.shape)

            hooks = [] if mode == "clean" else [(name, splice)]
            with model.lock, torch.inference_mode():
                logits = model.bridge.run_with_hooks(ids, fwd_hooks=hooks)
            lp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
            losses[mode] += float(-(lp * target_ok).sum())
        count += int(target_ok.sum())
    out = {f"ce_{m}": v / count for m, v in losses.items()}
    if clean is not None:
        out["ce_clean"] = clean
    c, s, z, m = (out[f"ce_{k}"] for k in ("clean", "sae", "zero", "mean"))
    out.update(ce_tokens=count, delta_loss=s - c,
               ce_recovered=(z - s) / (z - c) if z != c else float("nan"),
               ce_recovered_vs_mean=(m - s) / (m - c) if m != c else float("nan"))
    return out


def clean_loss(model, seqs: list[list[int]]) -> float:
    """Mean next-token CE loss of the unmodified model over the sequences."""
    import torch

    total, count = 0.0, 0
    for idx in _batches([(0, 0, s) for s in seqs], max_tokens=1024):
        ids, mask = _pad([seqs[i] for i in idx])
        with model.lock, torch.inference_mode():
            logits = model.bridge(ids)
        lp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
        total += float(-(lp * mask[:, 1:]).sum())
        count += int(mask[:, 1:].sum())
    return total / count


def quality(model, cfg: TrainConfig, sae_dir: Path, site: Site, heldout_acts: np.ndarray,
            mean_act, ce_seqs: list[list[int]], ood_seqs: list[list[int]],
            clean: tuple[float, float] | None = None) -> dict:
    import torch

    sae = _eval_sae(sae_dir)
    ood_ids, ood_mask = _pad(ood_seqs)
    ood_mask[:, 0] = False
    ood_acts = site_activations(model, [site], ood_ids)[0][ood_mask].numpy()
    q = {"heldout": {**activation_metrics(sae, heldout_acts, cfg.dense_threshold),
                     **ce_metrics(model, sae, site, ce_seqs, torch.as_tensor(mean_act),
                                  clean and clean[0])},
         "unlike_training": {**activation_metrics(sae, ood_acts, cfg.dense_threshold),
                             **ce_metrics(model, sae, site, ood_seqs, torch.as_tensor(mean_act),
                                          clean and clean[1])}}
    return q


# -- saving -------------------------------------------------------------------------------
def save_fp16(trained_sae, out: Path) -> None:
    """Save the inference SAE in SAELens's folder format with float16 weights."""
    import torch
    from safetensors.torch import load_file, save_file

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    trained_sae.save_inference_model(str(tmp))
    w = tmp / "sae_weights.safetensors"
    save_file({k: v.to(torch.float16).contiguous() for k, v in load_file(str(w)).items()}, str(w))
    cfg = json.loads((tmp / "cfg.json").read_text())
    cfg["dtype"] = "float32"   # stored as float16, loaded (exactly) into float32
    (tmp / "cfg.json").write_text(json.dumps(cfg, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)


# -- entry point --------------------------------------------------------------------------
def train(cfg: TrainConfig, out_dir: Path | None = None, work: Path | None = None, root=None,
          progress: Callable[[str], None] | None = None) -> list[dict]:
    """Collect activations once, train every SAE of cfg.sites, measure and save them."""
    import torch

    from .model import load_model

    out_dir = Path(out_dir or SAE_DIR)
    work = Path(work or settings.cache_dir() / "sae-train" / cfg.cache_key())
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_text(json.dumps(asdict(cfg)))
    model = load_model(cfg.model)
    for c, layer in cfg.sites:
        Site(Component(c), layer).check(model.info.n_layers, model.info.n_heads)
        if Component(c) not in (Component.RESID_PRE, Component.RESID_POST, Component.RESID_MID,
                                Component.Z, Component.ATTN_OUT, Component.MLP_OUT):
            raise InvalidSpec(f"SAEs are trained on residual, attention or MLP outputs, not {c!r}.")
    corpus.tokenize(cfg.model, cfg.corpus, root)
    t0 = time.perf_counter()
    train_acts = collect(model, cfg, "train", cfg.train_tokens, work, root, progress)
    held_acts = collect(model, cfg, "heldout", cfg.heldout_tokens, work, root, progress)
    collect_s = time.perf_counter() - t0
    ce_seqs = [w[2] for w in _sample_windows(cfg, "heldout", 10**12, root)[:cfg.ce_windows]]
    ood_seqs = [model.encode(t, max_tokens=10**6) for t in EVAL_TEXTS[:cfg.eval_texts]]
    clean = (clean_loss(model, ce_seqs), clean_loss(model, ood_seqs))
    reports = []
    for j, (c, layer) in enumerate(cfg.sites):
        site = Site(Component(c), layer)
        sid = sae_id(cfg.model, c, layer)
        dest = out_dir / sid
        t = time.perf_counter()
        if not (dest / "quality.json").exists():
            if progress:
                progress(f"training {sid} on {len(train_acts[j])} activations x {cfg.epochs} epochs")
            sae = train_one(cfg, c, layer, train_acts[j], work, progress)
            save_fp16(sae, dest)
            train_s = time.perf_counter() - t
            mean_act = torch.from_numpy(np.array(train_acts[j][:50_000])).float().mean(0)
            q = quality(model, cfg, dest, site, held_acts[j], mean_act, ce_seqs, ood_seqs, clean)
            report = {"sae_id": sid, "hook_name": hook_name(site), "model": cfg.model,
                      "architecture": "topk", "k": cfg.k, "d_in": int(train_acts[j].shape[1]),
                      "d_sae": cfg.width, "weights_dtype": "float16",
                      "training": {"unique_tokens": int(len(train_acts[j])), "epochs": cfg.epochs,
                                   "samples": int(len(train_acts[j]) * cfg.epochs), "batch": cfg.batch,
                                   "lr": cfg.lr, "corpus": cfg.corpus,
                                   "activation_seconds_all_sites": round(collect_s, 1),
                                   "train_and_eval_seconds": round(time.perf_counter() - t, 1),
                                   "train_seconds": round(train_s, 1)},
                      "quality": q}
            (dest / "quality.json").write_text(json.dumps(report, indent=1))
            if progress:
                progress(f"{sid}: {json.dumps(q)}")
        reports.append(json.loads((dest / "quality.json").read_text()))
    return reports


def add_cli_args(p) -> None:
    d = TrainConfig()
    p.add_argument("--model", default=d.model)
    p.add_argument("--sites", default=",".join(f"{c}:{layer}" for c, layer in d.sites),
                   help="component:layer,... (components as in backend.sites)")
    p.add_argument("--corpus", default=d.corpus)
    p.add_argument("--tokens", type=int, default=d.train_tokens, help="unique training activations")
    p.add_argument("--heldout-tokens", type=int, default=d.heldout_tokens)
    p.add_argument("--ce-windows", type=int, default=d.ce_windows)
    p.add_argument("--context", type=int, default=d.context)
    p.add_argument("--width", type=int, default=d.width)
    p.add_argument("--k", type=int, default=d.k)
    p.add_argument("--epochs", type=float, default=d.epochs)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--out", default=None, help="where SAE folders go (default data/saes)")
    p.add_argument("--work", default=None, help="activation cache and checkpoints")


def run_cli(a) -> dict:
    sites = tuple((s.split(":")[0], int(s.split(":")[1])) for s in a.sites.split(","))
    cfg = TrainConfig(model=a.model, sites=sites, corpus=a.corpus, train_tokens=a.tokens,
                      heldout_tokens=a.heldout_tokens, ce_windows=a.ce_windows, context=a.context,
                      width=a.width, k=a.k, epochs=a.epochs, batch=a.batch, lr=a.lr)
    reports = train(cfg, a.out, a.work, progress=lambda m: print(m, file=sys.stderr))
    return {"saes": reports}


__all__ = ["TrainConfig", "train", "PLAN", "EVAL_TEXTS", "sae_id", "site_activations"]
