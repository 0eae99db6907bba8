"""Train the project's SAEs offline: one activation cache, then SAELens's SAETrainer per SAE.

    python -m backend train-sae --model smollm2-135m            # the shipped set (see PLAN)
    python -m backend train-sae --sites resid_pre:15 --tokens 20000 --width 1024 --out /tmp/saes
    python -m backend train-sae --collect-only                  # only the activation cache
    python -m backend train-sae --only 3 --compare old-saes/    # one site; old SAEs measured beside

1. Activations. Windows of the corpus's train split (never crossing a document), in a seeded
   random order cut into chunks of ~32 k tokens, run through the model once for all sites:
   LoadedModel.capture stops the forward as soon as the deepest site has fired. Position 0 of
   every window is dropped: the first token carries the model's massive activations (|x| ~
   10^4 from layer 15 on, FINDINGS), which no reconstruction objective should spend latents
   on; the same position is left untouched when the SAE is spliced in for the CE metrics.
   The training caches come from the dense kernel (kernels/forward.py) in `precision`
   ("bf16-mixed" by default: bfloat16 matmuls, float32 residual stream; ~0.5-1.7 % relative
   error per activation, 2x the float32 speed with AMX); the held-out cache and every
   evaluation use the float32 bridge.
   Chunks are float16 .npz files in the work directory; a larger or interrupted run reuses
   every finished chunk, and collect-<split>.json records tokens/s. With --engine ray the
   missing chunks are Ray tasks (one actor per worker loads the model once; each writes its
   chunk's file, the same file the local engine writes); the work directory must then be a
   folder every Ray node sees.
2. Training. Each SAE is a TopK SAE (k latents per token, k_z for hook_z) with the aux-k loss
   on dead latents (those silent for `dead_window` samples: a short window and a coefficient of
   1/4 keep them alive; SAETrainer's window of an eighth of the run let 8-20 % die), trained
   with SAELens's SAETrainer over an iterator of batches drawn from the cache (seeded
   permutation per epoch). Checkpoints land in the work directory; a rerun resumes from the
   last one. Sites can be trained in separate processes (`--only`).
3. Quality, stored as quality.json beside the weights, always with position 0 left out: on
   the held-out activation cache (L0, variance explained, error per token, dead and dense
   latents, dead counted over `dead_tokens` more training activations), on held-out windows
   of every kind of corpus text (per kind and pooled, with CE loss clean / SAE spliced in /
   zero- / mean-ablated, CE recovered, delta loss) and on the project's own out-of-corpus
   passages in tests/passages ("unlike_training", per passage too); "worst" holds the worst
   kind and passage. With --compare, the earlier SAEs of the same ids are measured on the
   same data and reported beside, as "previous". Weights are saved in SAELens's folder
   format in float16, and the metrics are measured with those float16 weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, ClassVar, Iterable

import numpy as np

from . import corpus, settings
from .errors import InvalidSpec
from .jobs.driver import CorpusJob, drive_files
from .sites import Component, Site, hook_name

SAE_DIR = settings.DATA_DIR / "saes"

# (component, layer) of the shipped SAEs of the default model: the residual stream early,
# middle and late, and the attention output (hook_z, heads concatenated) of layer 23, where
# the IOI name-mover head L23H3 sits.
PLAN = [(Component.RESID_PRE, 5), (Component.RESID_PRE, 15), (Component.RESID_PRE, 25),
        (Component.Z, 23)]

@dataclass(frozen=True)
class TrainConfig:
    model: str = "smollm2-135m"
    sites: tuple[tuple[str, int], ...] = tuple((c.value, layer) for c, layer in PLAN)
    corpus: str = corpus.DEFAULT_NAME
    train_tokens: int = 1_600_000     # unique activations cached for training (per site; whole chunks)
    heldout_tokens: int = 40_000      # held-out activations for L0 / VE / dead / dense
    ce_windows: int = 5               # held-out windows per corpus kind for the CE metrics
    context: int = 128
    width: int = 4608                 # d_sae
    k: int = 64                       # active latents per token (residual stream SAEs)
    k_z: int = 64                     # ... for hook_z SAEs (attention outputs need more)
    aux_coefficient: float = 0.25     # TopK aux-k loss on dead latents
    dead_tokens: int = 100_000        # training activations added to the held-out ones for "dead"
    dead_window: int = 50_000         # samples without firing before the aux-k loss acts on a latent
                                      # (0: an eighth of the run, SAETrainer's usual window; at 1/16
                                      # and that window 8-20 % of the latents died over 4,700 steps)
    epochs: float = 4.5               # L15 at 4,608 latents: 1.5 -> 4.5 epochs took VE on the passages 0.820 -> 0.833
    batch: int = 512
    lr: float = 1e-3
    seed: int = 0
    dense_threshold: float = 0.1      # a latent firing on more than this share is "dense"
    eval_texts: int = 100             # how many of the test passages (tests/passages) to measure on
    precision: str = "bf16-mixed"     # the training caches' forward (kernels/forward.PRECISIONS);
                                      # every quality figure is measured on the float32 bridge
    autocast: bool = False            # SAETrainer's bfloat16 autocast: slower than float32 here (2.8 k vs 3.8 k samples/s)
    sparse_kernel: bool = True        # kernels/sae_train.py: SAELens's loss and gradients, sparse backward
    init_from: str | None = None      # a folder of SAEs (same ids) to continue training from, for
                                      # `epochs` more epochs (their own samples are counted too)

    def k_for(self, component: str) -> int:
        return self.k_z if component == Component.Z.value else self.k

    def cache_key(self) -> str:
        d = {k: getattr(self, k) for k in ("model", "sites", "corpus", "context", "seed")}
        if self.precision != "float32":
            d["precision"] = self.precision
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def sae_id(model: str, component: str, layer: int) -> str:
    return f"{model}-L{layer}-{component}"


# -- windows ------------------------------------------------------------------------------
_batches = corpus.length_batches      # windows grouped by length (right-padded batches)
_pad = corpus.pad_right


# -- activations --------------------------------------------------------------------------
def site_activations(model, sites: list[Site], ids, precision: str = "float32"):
    """Activations [batch pos d] at each site (hook_z flattened over heads) from one forward
    that stops as soon as the deepest site has fired: LoadedModel.capture in float32, the
    dense kernel (kernels/forward.py) in another precision where the model has one."""
    names = [hook_name(s) for s in sites]
    if precision != "float32":
        from kernels import forward as kf

        dm = kf.dense_model(model, *kf.PRECISIONS[precision])
        if dm is not None:
            got = kf.run(dm, model.tensor(ids) if not hasattr(ids, "shape") else ids, capture=names)
            return [got[n].flatten(2).float() for n in names]
    got = model.capture(ids, names, flatten_heads=True)
    return [got[n] for n in names]


CHUNK_TOKENS = 32_768   # activations are cached in chunks of about this many tokens


def _chunks(cfg: TrainConfig, split: str, n_tokens: int, root=None,
            chunk_tokens: int | None = None) -> list[list[tuple[int, int, list[int]]]]:
    """The split's windows in a seeded random order, cut into consecutive chunks of about
    `chunk_tokens` (default CHUNK_TOKENS) positions (>= 1), as many as cover n_tokens. The
    order does not depend on n_tokens, so a larger run reuses every chunk a smaller one cached."""
    chunk_tokens = chunk_tokens or CHUNK_TOKENS
    wins = corpus.pick_windows(cfg.model, split, cfg.context, order="seeded", seed=cfg.seed + (split == "heldout"),
                               name=cfg.corpus, root=root, sort=False)
    chunks, cur, n, total = [], [], 0, 0
    for w in wins:
        cur.append(w)
        n += len(w[2]) - 1
        if n >= chunk_tokens:
            chunks.append(cur)
            total += n
            cur, n = [], 0
            if total >= n_tokens:
                break
    if cur and total < n_tokens:
        chunks.append(cur)
    return chunks


def _precision(cfg: TrainConfig, split: str) -> str:
    return cfg.precision if split == "train" else "float32"    # what is measured stays exact


def write_chunk(model, cfg: TrainConfig, split: str, wins, path: Path, on_tokens: Callable[[int], None] | None = None
                ) -> int:
    """One chunk of the activation cache: float16 activations [n d] per site (s0, s1, ... in
    cfg.sites order) of positions >= 1 of `wins`, written to a temporary file and renamed to
    `path` (a reader never sees a partial file; a killed writer leaves none). Returns the
    number of positions."""
    sites = [Site(Component(c), layer) for c, layer in cfg.sites]
    precision = _precision(cfg, split)
    parts: list[list[np.ndarray]] = [[] for _ in sites]
    n = 0
    for idx in _batches(wins):
        ids, mask = _pad([wins[i][2] for i in idx])
        mask[:, 0] = False
        for j, a in enumerate(site_activations(model, sites, ids, precision)):
            parts[j].append(a[mask].to("cpu").half().numpy())
        n += int(mask.sum())
        if on_tokens:
            on_tokens(int(mask.sum()))
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")   # one per writer: two may race on a chunk
    np.savez(tmp, **{f"s{j}": np.concatenate(p) for j, p in enumerate(parts)})
    tmp.replace(path)
    return n


@dataclass(frozen=True)
class ActivationCacheJob(CorpusJob):
    """The training's activation cache as a file-sink corpus job (jobs/driver.drive_files):
    chunk c is acts-<split>/chunk<c>.npz of `_chunks(...)`'s windows, written by write_chunk."""

    KIND: ClassVar[str] = "sae_activation_cache"
    cfg: TrainConfig
    split: str
    n_tokens: int
    work_dir: str
    root: str | None = None
    chunk_tokens: int = CHUNK_TOKENS

    @property
    def model(self) -> str:
        return self.cfg.model

    def key(self) -> str:
        return f"{self.KIND}-{self.split}-{self.work_dir}"

    def fields(self) -> dict:        # the config stays a TrainConfig (asdict would flatten it)
        return {"cfg": self.cfg, "split": self.split, "n_tokens": self.n_tokens, "work_dir": self.work_dir,
                "root": self.root, "chunk_tokens": self.chunk_tokens}

    @cached_property
    def chunks(self) -> list:
        return _chunks(self.cfg, self.split, self.n_tokens, self.root, self.chunk_tokens)

    @property
    def n_chunks(self) -> int:
        return len(self.chunks)

    def path(self, c: int) -> Path:
        return Path(self.work_dir) / f"acts-{self.split}" / f"chunk{c:05d}.npz"

    def chunk_done(self, c: int) -> bool:
        return self.path(c).exists()

    def work(self, spec, inputs, model, store=None):
        m = model()
        self.path(0).parent.mkdir(parents=True, exist_ok=True)
        return lambda c: write_chunk(m, self.cfg, self.split, self.chunks[c], self.path(c))


def collect(model, cfg: TrainConfig, split: str, n_tokens: int, work: Path, root=None,
            progress: Callable[[str], None] | None = None,
            load: Iterable[int] | None = None, engine: str = "local") -> list[np.ndarray | None]:
    """float16 activations [n d] per site for positions >= 1 of sampled windows, all sites
    from one forward per batch that stops after the deepest site. Cached per chunk (an
    interrupted or a larger run resumes chunk-wise); tokens/s goes to collect-<split>.json.
    engine "ray": the missing chunks are Ray tasks (backend/ray_engine.map_chunks, one actor
    per worker loads the model once; `model` is not used and may be None), each writing its
    chunk's file; then the files are read here as with the local engine."""
    from tqdm import tqdm

    sites = [Site(Component(c), layer) for c, layer in cfg.sites]
    precision = _precision(cfg, split)
    out_dir = work / f"acts-{split}"
    out_dir.mkdir(parents=True, exist_ok=True)
    job = ActivationCacheJob(cfg, split, n_tokens, str(Path(work).resolve()), None if root is None else str(root),
                             CHUNK_TOKENS)     # the module value now (a test may set it smaller)
    chunks = job.chunks
    sizes = [sum(len(w[2]) - 1 for w in ch) for ch in chunks]
    bar = tqdm(total=sum(sizes), desc=f"activations ({split})", unit="tok", file=sys.stderr,
               disable=progress is None)
    t0, fresh = time.perf_counter(), 0
    bar.update(sum(sizes) - sum(sizes[c] for c in range(len(chunks)) if not job.chunk_done(c)))

    def landed(c: int, n: int) -> None:
        nonlocal fresh
        fresh += sizes[c]
        bar.update(sizes[c])
    drive_files(job, engine, landed, model)
    bar.close()
    secs = time.perf_counter() - t0
    stats = {"split": split, "precision": precision, "tokens": int(sum(sizes)), "chunks": len(chunks),
             "windows": sum(len(ch) for ch in chunks), "sites": [hook_name(s) for s in sites],
             "collected_now": fresh, "seconds": round(secs, 1),
             "tokens_per_second": round(fresh / secs, 1) if fresh else None, "engine": engine}
    if fresh:
        (work / f"collect-{split}.json").write_text(json.dumps(stats))
    if progress:
        progress(f"activations ({split}): {json.dumps(stats)}")
    keep = set(range(len(sites)) if load is None else load)   # load only the sites asked for
    return [np.concatenate([np.load(out_dir / f"chunk{c:05d}.npz")[f"s{j}"] for c in range(len(chunks))])
            if j in keep else None for j in range(len(sites))]


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
        return self.acts[self._perm[i * self.batch:(i + 1) * self.batch]].float().to(settings.device())


def _training_sae(cfg: TrainConfig, component: str, layer: int, d_in: int):
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    meta = SAEMetadata(model_name=cfg.model, hook_name=hook_name(Site(Component(component), layer)),
                       context_size=cfg.context, prepend_bos=False, dataset_path=f"corpus:{cfg.corpus}")
    sae_cfg = TopKTrainingSAEConfig(d_in=d_in, d_sae=cfg.width, k=cfg.k_for(component), dtype="float32",
                                    device=settings.device(), normalize_activations="expected_average_only_in",
                                    reshape_activations="hook_z" if component == "z" else "none",
                                    aux_loss_coefficient=cfg.aux_coefficient, metadata=meta)
    if cfg.sparse_kernel:
        from kernels.sae_train import sparse_topk_training_sae
        return sparse_topk_training_sae(sae_cfg)
    return TopKTrainingSAE(sae_cfg)


def _dead_window_steps(cfg: TrainConfig, steps: int) -> int:
    if cfg.dead_window:
        return max(10, cfg.dead_window // cfg.batch)
    return max(10, steps // 8)


def train_one(cfg: TrainConfig, component: str, layer: int, acts: np.ndarray, work: Path,
              progress: Callable[[str], None] | None = None, init: Path | None = None,
              init_samples: int = 0):
    """Train one SAE from cached activations with SAETrainer; resume from its checkpoint.
    `init`: a saved SAE folder to go on training (see _continue_from), trained on
    `init_samples` samples of the same stream (this run continues where that one stopped)."""
    import torch
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(cfg.seed)
    total = int(len(acts) * cfg.epochs) // cfg.batch * cfg.batch
    steps = total // cfg.batch
    hp = hashlib.sha256(json.dumps([cfg.width, cfg.k_for(component), cfg.epochs, cfg.batch, cfg.lr,
                                    cfg.seed, cfg.aux_coefficient, len(acts)] + ([] if cfg.autocast else [0])
                                   + ([cfg.dead_window] if cfg.dead_window else [])
                                   + ([str(init)] if init is not None else [])).encode())
    ckpt_root = work / f"ckpt-{component}-{layer}-{hp.hexdigest()[:8]}"   # resume only the same run
    tcfg = SAETrainerConfig(
        total_training_samples=total, train_batch_size_samples=cfg.batch, lr=cfg.lr,
        lr_end=cfg.lr / 10, lr_scheduler_name="constant", lr_warm_up_steps=max(1, steps // 20),
        lr_decay_steps=max(1, steps // 5), device=settings.device(), dead_feature_window=_dead_window_steps(cfg, steps),
        feature_sampling_window=max(10, steps // 4), n_checkpoints=4 if steps >= 40 else 0,
        checkpoint_path=str(ckpt_root), logger=LoggingConfig(log_to_wandb=False), autocast=cfg.autocast,
        n_batches_for_norm_estimate=min(50, max(1, len(acts) // cfg.batch)))
    sae = _training_sae(cfg, component, layer, acts.shape[1])
    scale = _continue_from(sae, init, acts, cfg) if init is not None else None
    start = 0
    done = sorted((p for p in ckpt_root.glob("*") if p.name.isdigit()), key=lambda p: int(p.name))
    if done:
        from safetensors.torch import load_file
        last = done[-1]
        sae.load_state_dict(load_file(str(last / "sae_weights.safetensors")), strict=False)
        start = -1
    trainer = SAETrainer(cfg=tcfg, sae=sae, data_provider=None)
    if scale is not None:
        trainer.activation_scaler.scaling_factor = scale   # the scale the initial weights were trained at
    if start == -1:
        trainer.load_trainer_state(last)
        start = trainer.n_training_samples
        trainer.checkpoint_thresholds = [t for t in trainer.checkpoint_thresholds if t > start]
        if progress:
            progress(f"resuming {component}:{layer} at {start}/{total} samples from {last}")
    trainer.data_provider = _Batches(acts, cfg.batch, cfg.seed, init_samples + start)
    return trainer.fit()


def _continue_from(sae, folder: Path, acts: np.ndarray, cfg: TrainConfig) -> float:
    """Load a saved inference SAE into a training SAE to go on training it: its weights carry
    the activation-norm scale folded in, so estimate that scale as its run did (the first
    batches of the same stream) and unfold it. Returns the scale."""
    import torch
    from safetensors.torch import load_file
    from sae_lens.training.activation_scaler import ActivationScaler

    w = {k: v.float() for k, v in load_file(str(folder / "sae_weights.safetensors")).items()}
    want = {k: tuple(v.shape) for k, v in sae.state_dict().items() if k in w}
    if set(want) != {"W_enc", "W_dec", "b_enc", "b_dec"} or any(tuple(w[k].shape) != want[k] for k in want):
        raise InvalidSpec(f"{folder} does not match the SAE being trained "
                          f"({ {k: tuple(v.shape) for k, v in w.items()} } vs {want}).")
    n = min(50, max(1, len(acts) // cfg.batch))   # as train_one's n_batches_for_norm_estimate
    scaler = ActivationScaler()
    scaler.estimate_scaling_factor(acts.shape[1], _Batches(acts, cfg.batch, cfg.seed, 0), n)
    s = float(scaler.scaling_factor)
    with torch.no_grad():
        sae.W_enc.copy_(w["W_enc"] / s)
        sae.W_dec.copy_(w["W_dec"] * s)
        sae.b_dec.copy_(w["b_dec"] * s)
        sae.b_enc.copy_(w["b_enc"])
    return s


# -- quality ------------------------------------------------------------------------------
def _eval_sae(sae_dir: Path):
    from sae_lens import SAE

    sae = SAE.load_from_disk(str(sae_dir), device=settings.device(), dtype="float32").eval()
    if sae.cfg.reshape_activations == "hook_z":
        sae.turn_off_forward_pass_hook_z_reshaping()   # we pass heads flattened
    return sae


PASSAGES_DIR = settings.ROOT / "tests" / "passages"


def passages(folder: Path | None = None) -> dict[str, str]:
    """The project's own out-of-corpus test passages (a story, a recipe, news, a chat, an
    e-mail, a review, Python, JavaScript), written for this project: name -> text."""
    folder = Path(folder or PASSAGES_DIR)
    return {p.name.split(".")[0]: p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.txt"))}


def activation_metrics(sae, acts: np.ndarray, dense_threshold: float, batch: int = 2048) -> dict:
    """On activations [n d] (heads flattened; positions >= 1 only): L0, variance explained
    (1 - SSE / total variance around the mean), the reconstruction error per token
    ||x - x_hat||^2 / ||x||^2 (median and mean; not dominated by a few massive tokens as
    variance explained can be), dead and dense latent fractions."""
    import torch

    freq = torch.zeros(sae.cfg.d_sae)
    l0 = sse = 0.0
    n = len(acts)
    x_all = torch.from_numpy(np.asarray(acts, dtype=np.float32))
    mean = x_all.mean(0)
    sst = float(((x_all - mean) ** 2).sum())
    rel = []
    with torch.inference_mode():
        for i in range(0, n, batch):
            x = x_all[i:i + batch].to(sae.W_dec.device)
            f = sae.encode(x)
            rec = sae.decode(f)
            fired = f > 0
            freq += fired.float().sum(0).cpu()
            l0 += float(fired.sum())
            err = ((rec - x) ** 2).sum(-1)
            sse += float(err.sum())
            rel.append((err / (x ** 2).sum(-1).clamp_min(1e-12)).cpu())
    freq /= n
    rel_t = torch.cat(rel)
    return {"tokens": n, "l0": l0 / n, "variance_explained": 1 - sse / sst,
            "rel_error_median": float(rel_t.median()), "rel_error_mean": float(rel_t.mean()),
            "dead_fraction": float((freq == 0).float().mean()),
            "dense_fraction": float((freq > dense_threshold).float().mean()),
            "mse_per_token": sse / n}


def _token_losses(logits, ids, mask) -> tuple[float, int]:
    lp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    ok = mask[:, 1:]
    return float(-(lp * ok).sum()), int(ok.sum())


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

            with torch.inference_mode():
                logits = (model.logits(ids) if mode == "clean"
                          else model.run_with_hooks(ids, fwd_hooks=[(name, splice)]))
            loss, n = _token_losses(logits, ids, mask)
            losses[mode] += loss
        count += n
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
        with torch.inference_mode():
            loss, n = _token_losses(model.logits(ids), ids, mask)
        total += loss
        count += n
    return total / count


@dataclass
class EvalData:
    """What every SAE is measured on, collected once for all sites: named sets of token
    sequences (held-out windows per corpus kind, the test passages), their activations at
    each site (positions >= 1) and their clean losses."""
    seqs: dict[str, list[list[int]]]
    acts: dict[str, list[np.ndarray]]
    clean: dict[str, float]


def eval_data(model, cfg: TrainConfig, root=None, passages_dir: Path | None = None,
              windows_per_kind: int | None = None) -> EvalData:
    """Held-out windows of every kind in the corpus (`windows_per_kind` each, seeded) and the
    out-of-corpus passages, with activations at every site of cfg and clean losses."""
    sites = [Site(Component(c), layer) for c, layer in cfg.sites]
    docs = corpus.documents(cfg.corpus, root, split="heldout")
    kind_of_src = {s["name"]: s["kind"] for s in corpus.stats(cfg.corpus, root, cfg.model)["sources"]}
    kind_of_doc = {d: kind_of_src.get(s, "other")
                   for d, s in zip(docs["doc_id"].to_pylist(), docs["source"].to_pylist())}
    wins = corpus.windows(cfg.model, "heldout", cfg.context, cfg.corpus, root)
    windows_per_kind = windows_per_kind or cfg.ce_windows
    rng = np.random.default_rng(cfg.seed + 7)
    seqs: dict[str, list[list[int]]] = {}
    for kind in corpus.KINDS:
        mine = [w[2] for w in wins if kind_of_doc.get(w[0]) == kind and len(w[2]) >= 16]
        if mine:
            pick = rng.permutation(len(mine))[:windows_per_kind]
            seqs[f"heldout:{kind}"] = [mine[i] for i in sorted(pick)]
    texts = list(passages(passages_dir).items())[:cfg.eval_texts] if cfg.eval_texts else []
    for name, text in texts:
        seqs[f"passage:{name}"] = [model.tokenize(text)]
    acts: dict[str, list[np.ndarray]] = {}
    for name, ss in seqs.items():
        ids, mask = _pad(ss)
        mask[:, 0] = False
        acts[name] = [a[mask].float().numpy() for a in site_activations(model, sites, ids)]
    clean = {name: clean_loss(model, ss) for name, ss in seqs.items()}
    return EvalData(seqs, acts, clean)


def _pooled(names: list[str], ed: EvalData, j: int):
    seqs = [s for n in names for s in ed.seqs[n]]
    acts = np.concatenate([ed.acts[n][j] for n in names])
    n_tok = [sum(len(s) - 1 for s in ed.seqs[n]) for n in names]
    clean = sum(ed.clean[n] * t for n, t in zip(names, n_tok)) / sum(n_tok)
    return seqs, acts, clean


def quality(model, cfg: TrainConfig, sae_dir: Path, j: int, heldout_acts: np.ndarray,
            mean_act, ed: EvalData, dead_acts: np.ndarray | None = None) -> dict:
    """The figures of one SAE (site j of cfg.sites): on the held-out activation cache
    (L0, variance explained, error per token, dead / dense), pooled over the held-out
    windows of every kind ("heldout", with CE), per kind, pooled over the test passages
    ("unlike_training") and per passage. Position 0 is left out everywhere."""
    import torch

    c, layer = cfg.sites[j]
    site = Site(Component(c), layer)
    sae = _eval_sae(sae_dir)
    mean_act = torch.as_tensor(mean_act)

    def one(names: list[str]) -> dict:
        seqs, acts, clean = _pooled(names, ed, j)
        m = activation_metrics(sae, acts, cfg.dense_threshold)
        del m["dead_fraction"], m["dense_fraction"]
        return {**m, **ce_metrics(model, sae, site, seqs, mean_act, clean)}

    def pooled_ce(parts: list[dict]) -> dict:
        """CE figures of several sets pooled (token-weighted), as if measured together."""
        n = sum(p["ce_tokens"] for p in parts)
        out = {f"ce_{k}": sum(p[f"ce_{k}"] * p["ce_tokens"] for p in parts) / n
               for k in ("clean", "sae", "zero", "mean")}
        c, s_, z, m = (out[f"ce_{k}"] for k in ("clean", "sae", "zero", "mean"))
        out.update(ce_tokens=n, delta_loss=s_ - c, ce_recovered=(z - s_) / (z - c),
                   ce_recovered_vs_mean=(m - s_) / (m - c))
        return out

    held = [n for n in ed.seqs if n.startswith("heldout:")]
    pas = [n for n in ed.seqs if n.startswith("passage:")]
    big = activation_metrics(sae, heldout_acts, cfg.dense_threshold)
    if dead_acts is not None:   # dead / dense over more tokens than the held-out cache
        more = activation_metrics(sae, dead_acts, cfg.dense_threshold)
        big.update(dead_fraction=more["dead_fraction"], dense_fraction=more["dense_fraction"])
    by_kind = {n.split(":", 1)[1]: one([n]) for n in held}
    by_passage = {n.split(":", 1)[1]: activation_metrics(sae, ed.acts[n][j], cfg.dense_threshold)
                  for n in pas}
    pooled_held = activation_metrics(sae, np.concatenate([ed.acts[n][j] for n in held]), cfg.dense_threshold)
    del pooled_held["dead_fraction"], pooled_held["dense_fraction"]
    q = {"heldout": {**pooled_held, **pooled_ce(list(by_kind.values())),
                     **{k: big[k] for k in ("dead_fraction", "dense_fraction")},
                     "cache": big},
         "heldout_by_kind": by_kind,
         "unlike_training": one(pas) if pas else {},
         "passages": {n: {k: v[k] for k in ("tokens", "variance_explained", "rel_error_median")}
                      for n, v in by_passage.items()}}
    vals = [v["variance_explained"] for v in by_kind.values()]
    q["worst"] = {"variance_explained_heldout_kind": min(vals) if vals else None,
                  "variance_explained_passage": min((v["variance_explained"] for v in by_passage.values()),
                                                    default=None),
                  "ce_recovered_vs_mean_heldout_kind": min((v["ce_recovered_vs_mean"] for v in by_kind.values()),
                                                           default=None),
                  "delta_loss_heldout_kind": max((v["delta_loss"] for v in by_kind.values()), default=None)}
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
def _check_sites(model, cfg: TrainConfig) -> None:
    for c, layer in cfg.sites:
        Site(Component(c), layer).check(model.info.n_layers, model.info.n_heads)
        if Component(c) not in (Component.RESID_PRE, Component.RESID_POST, Component.RESID_MID,
                                Component.Z, Component.ATTN_OUT, Component.MLP_OUT):
            raise InvalidSpec(f"SAEs are trained on residual, attention or MLP outputs, not {c!r}.")


def train(cfg: TrainConfig, out_dir: Path | None = None, work: Path | None = None, root=None,
          progress: Callable[[str], None] | None = None, collect_only: bool = False,
          only: tuple[int, ...] | None = None, compare: Path | None = None, engine: str = "local") -> list[dict]:
    """Collect activations once (all sites, one pass), train every SAE of cfg.sites (or the
    indices in `only`), measure and save them. `compare`: a folder of earlier SAEs (same ids)
    measured on the same data, whose figures go beside the new ones as "previous". `engine`
    "ray": the activation cache's chunks are collected by Ray workers (collect)."""
    import torch

    from .model import load_model

    out_dir = Path(out_dir or SAE_DIR)
    if cfg.init_from and Path(cfg.init_from).resolve() == out_dir.resolve():
        raise InvalidSpec("--init-from and --out are the same folder: the new SAEs need another one.")
    work = Path(work or settings.cache_dir() / "sae-train" / cfg.cache_key())
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_text(json.dumps(asdict(cfg)))
    model = load_model(cfg.model)
    _check_sites(model, cfg)
    corpus.tokenize(cfg.model, cfg.corpus, root)
    t0 = time.perf_counter()
    train_acts = collect(model, cfg, "train", cfg.train_tokens, work, root, progress, only, engine=engine)
    held_acts = collect(model, cfg, "heldout", cfg.heldout_tokens, work, root, progress, only, engine=engine)
    collect_s = time.perf_counter() - t0
    rates = {p.stem: json.loads(p.read_text()) for p in sorted(work.glob("collect-*.json"))}
    if collect_only:
        return list(rates.values())
    ed = eval_data(model, cfg, root)
    reports = []
    for j, (c, layer) in enumerate(cfg.sites):
        if only is not None and j not in only:
            continue
        site = Site(Component(c), layer)
        sid = sae_id(cfg.model, c, layer)
        dest = out_dir / sid
        t = time.perf_counter()
        if not (dest / "quality.json").exists():
            k = cfg.k_for(c)
            if progress:
                progress(f"training {sid} (k={k}) on {len(train_acts[j])} activations x {cfg.epochs} epochs")
            init = Path(cfg.init_from) / sid if cfg.init_from else None
            if init is not None and not (init / "sae_weights.safetensors").exists():
                raise InvalidSpec(f"--init-from: no SAE {sid} in {cfg.init_from}.")
            before = (json.loads((init / "quality.json").read_text()).get("training", {})
                      if init is not None and (init / "quality.json").exists() else {})
            before_samples = int(before.get("samples", 0))
            sae = train_one(cfg, c, layer, train_acts[j], work, progress, init, before_samples)
            save_fp16(sae, dest)
            train_s = time.perf_counter() - t
            mean_act = torch.from_numpy(np.asarray(train_acts[j][:50_000], dtype=np.float32)).mean(0)
            dead_acts = np.concatenate([held_acts[j], train_acts[j][-cfg.dead_tokens:]])
            q = quality(model, cfg, dest, j, held_acts[j], mean_act, ed, dead_acts)
            report = {"sae_id": sid, "hook_name": hook_name(site), "model": cfg.model,
                      "architecture": "topk", "k": k, "d_in": int(train_acts[j].shape[1]),
                      "d_sae": cfg.width, "weights_dtype": "float16",
                      "training": {"unique_tokens": int(len(train_acts[j])), "epochs": cfg.epochs,
                                   "samples": int(len(train_acts[j]) * cfg.epochs) + before_samples,
                                   "batch": cfg.batch,
                                   "lr": cfg.lr, "aux_coefficient": cfg.aux_coefficient,
                                   "dead_window_samples": cfg.batch * _dead_window_steps(
                                       cfg, int(len(train_acts[j]) * cfg.epochs) // cfg.batch),
                                   "corpus": cfg.corpus, "corpus_words": _corpus_words(cfg, root),
                                   "activation_seconds_all_sites": round(collect_s, 1),
                                   "activation_collection": rates,
                                   "train_seconds": round(train_s, 1),
                                   "train_samples_per_second": round(len(train_acts[j]) * cfg.epochs / train_s, 1),
                                   "train_and_eval_seconds": round(time.perf_counter() - t, 1),
                                   **({"continued_from": {"folder": str(cfg.init_from), "samples": before_samples,
                                                          "epochs_this_run": cfg.epochs, "training": before}}
                                      if init is not None else {})},
                      "evaluation": {"heldout_kinds": sorted(n.split(":", 1)[1] for n in ed.seqs
                                                             if n.startswith("heldout:")),
                                     "passages": sorted(n.split(":", 1)[1] for n in ed.seqs
                                                        if n.startswith("passage:")),
                                     "dead_measured_on_tokens": int(len(dead_acts)),
                                     "first_position": "left out"},
                      "quality": q}
            if compare is not None and (Path(compare) / sid).is_dir():
                report["previous"] = _previous(model, cfg, Path(compare), sid, j, held_acts[j],
                                               dead_acts, mean_act, ed, work)
            (dest / "quality.json").write_text(json.dumps(report, indent=1))
            if progress:
                progress(f"{sid}: {json.dumps(q['worst'])}")
        reports.append(json.loads((dest / "quality.json").read_text()))
    return reports


def _previous(model, cfg, folder: Path, sid: str, j: int, held_acts, dead_acts, mean_act, ed,
              work: Path) -> dict:
    """Figures of an earlier SAE with the same id on the same data (cached in the work dir)."""
    cached = work / f"previous-{sid}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    prev = {"path": str(folder), "quality": quality(model, cfg, folder / sid, j, held_acts, mean_act, ed,
                                                    dead_acts)}
    meta = folder / sid / "quality.json"
    if meta.exists():
        old = json.loads(meta.read_text())
        prev.update(k=old.get("k"), d_sae=old.get("d_sae"), training=old.get("training"))
    cached.write_text(json.dumps(prev))
    return prev


def measure_previous(cfg: TrainConfig, folder: Path, work: Path | None = None, root=None,
                     progress: Callable[[str], None] | None = None, engine: str = "local") -> list[dict]:
    """Measure the SAEs in `folder` (ids as cfg.sites would train) on the evaluation data of
    a training run, before it trains: the figures land in the work dir, where train(...,
    compare=folder) picks them up. Dead latents are counted on the held-out cache plus the
    first `dead_tokens` training activations."""
    import torch

    from .model import load_model

    work = Path(work or settings.cache_dir() / "sae-train" / cfg.cache_key())
    work.mkdir(parents=True, exist_ok=True)
    model = load_model(cfg.model)
    _check_sites(model, cfg)
    train_acts = collect(model, cfg, "train", cfg.dead_tokens, work, root, progress, engine=engine)
    held_acts = collect(model, cfg, "heldout", cfg.heldout_tokens, work, root, progress, engine=engine)
    ed = eval_data(model, cfg, root)
    out = []
    for j, (c, layer) in enumerate(cfg.sites):
        sid = sae_id(cfg.model, c, layer)
        if not (Path(folder) / sid).is_dir():
            continue
        mean_act = torch.from_numpy(np.asarray(train_acts[j][:50_000], dtype=np.float32)).mean(0)
        dead_acts = np.concatenate([held_acts[j], train_acts[j][:cfg.dead_tokens]])
        out.append({"sae_id": sid, **_previous(model, cfg, Path(folder), sid, j, held_acts[j], dead_acts,
                                               mean_act, ed, work)})
        if progress:
            progress(f"previous {sid}: {json.dumps(out[-1]['quality']['worst'])}")
    return out


def _corpus_words(cfg: TrainConfig, root=None) -> int | None:
    try:
        return corpus.stats(cfg.corpus, root, cfg.model)["words"]
    except corpus.CorpusUnavailable:
        return None


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
    p.add_argument("--k", type=int, default=d.k, help="active latents per token (residual SAEs)")
    p.add_argument("--k-z", type=int, default=d.k_z, help="active latents per token (hook_z SAEs)")
    p.add_argument("--aux", type=float, default=d.aux_coefficient, help="aux-k loss coefficient")
    p.add_argument("--dead-window", type=int, default=d.dead_window,
                   help="training samples without firing after which the aux-k loss acts on a latent "
                        "(0: an eighth of the run)")
    p.add_argument("--dense-reference", action="store_true",
                   help="train with SAELens's own dense training forward (kernels/sae_train.py is the default)")
    p.add_argument("--only", default=None, help="train only these sites (indices into --sites, e.g. 0,2)")
    p.add_argument("--compare", default=None,
                   help="folder of earlier SAEs to measure on the same data (goes into quality.json)")
    p.add_argument("--epochs", type=float, default=d.epochs)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--init-from", default=None,
                   help="folder of saved SAEs (same ids) to go on training for --epochs more epochs "
                        "(measured on the shipped SAEs: 4 more epochs at --lr 1e-3 made them worse, not better; "
                        "use it to adapt an SAE to another corpus, with a smaller --lr)")
    p.add_argument("--out", default=None, help="where SAE folders go (default data/saes)")
    p.add_argument("--work", default=None, help="activation cache and checkpoints")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (1 is fastest on a machine shared with other jobs)")
    p.add_argument("--measure-previous", action="store_true",
                   help="measure the --compare SAEs on this run's evaluation data, then stop")
    p.add_argument("--precision", default=d.precision, choices=["float32", "bf16-mixed", "bf16"],
                   help="the forward that fills the training caches (quality is always measured in float32)")
    p.add_argument("--collect-only", action="store_true",
                   help="only cache the activations (all sites, one pass) and report tokens/s")
    from .jobs import add_engine_args

    add_engine_args(p)   # ray: the activation cache's chunks on Ray workers (a --work folder they all see)


def run_cli(a) -> dict:
    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    sites = tuple((s.split(":")[0], int(s.split(":")[1])) for s in a.sites.split(","))
    cfg = TrainConfig(model=a.model, sites=sites, corpus=a.corpus, train_tokens=a.tokens,
                      heldout_tokens=a.heldout_tokens, ce_windows=a.ce_windows, context=a.context,
                      width=a.width, k=a.k, k_z=a.k_z, aux_coefficient=a.aux, dead_window=a.dead_window, epochs=a.epochs,
                      batch=a.batch, lr=a.lr, precision=a.precision,
                      sparse_kernel=not a.dense_reference, init_from=a.init_from)
    only = tuple(int(i) for i in a.only.split(",")) if a.only else None
    if a.measure_previous:
        return {"previous": measure_previous(cfg, Path(a.compare), a.work,
                                             progress=lambda m: print(m, file=sys.stderr), engine=a.engine)}
    reports = train(cfg, a.out, a.work, progress=lambda m: print(m, file=sys.stderr),
                    collect_only=a.collect_only, only=only, compare=a.compare, engine=a.engine)
    return {"collected": reports} if a.collect_only else {"saes": reports}


__all__ = ["TrainConfig", "train", "PLAN", "passages", "sae_id", "site_activations", "eval_data", "quality"]
