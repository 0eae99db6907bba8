"""Gradients of one output with respect to the residual stream entering a block, batched: the
inner loop of gradient attributions over input tokens (backend/analyses/token_attribution.py).

The output f is a readout of the last position: one token's logit, or the difference of two
tokens' logits. An engine evaluates, for a batch of residual streams X [B T d_model] entering
block `start` (start = 0: the token embeddings, the value at `hook_embed`),

    f(X_b)  for every row b,   and   sum_b w_b * df(X_b)/dX_b   [T d_model]

in float32, chunked over rows (CHUNK_TOKENS rows x positions per forward) so that a round of
Integrated-Gradients steps is one batch through the model however many steps it has.

Two engines, tested equal (tests/test_token_attribution.py):

- `HookEngine` (reference, any architecture): a forward of the LoadedModel with a hook at
  `hook_embed` (or `blocks.L.hook_resid_pre`) that replaces the activation by a leaf tensor
  requiring grad; the logits of the last position only (logits_to_keep=1).
- `DenseEngine` (fast): the canonical-weight block of kernels.forward.DenseModel run as plain
  differentiable tensor code from block `start` on (fused attention, no Python hooks, no earlier
  blocks at all for a layer view), and the readout as the final norm of the last position dotted
  with the one or two rows of W_U it needs (never the full vocabulary). Llama-style models and
  Gemma-3 (what backend/model/weights.py describes). On SmolLM2 (one thread, 64 x 20 tokens)
  it is only ~1.05x the hook engine at the embeddings (both are matmul-bound: the saving is the
  vocabulary projection and the hooks), but a layer view from block L runs only blocks L.., where
  the hook engine reruns the whole model for every layer.

Parameters are never differentiated (torch.autograd.grad with respect to the inputs only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

CHUNK_TOKENS = 2048   # rows x positions per forward + backward (~1.5 MB of saved activations per token on SmolLM2)
EMBED = "hook_embed"


def resid_pre(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_pre"


@dataclass(frozen=True)
class Readout:
    """f = logit[target] at the last position, or logit[target] - logit[against]."""

    target: int
    against: int | None = None

    @property
    def ids(self) -> list[int]:
        return [self.target] if self.against is None else [self.target, self.against]

    def from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """[B d_vocab] -> [B]."""
        out = logits[:, self.target]
        return out if self.against is None else out - logits[:, self.against]

    def from_selected(self, sel: torch.Tensor) -> torch.Tensor:
        """[B 1 or 2] logits of self.ids -> [B]."""
        return sel[:, 0] if self.against is None else sel[:, 0] - sel[:, 1]


def _chunks(B: int, T: int) -> list[slice]:
    rows = max(1, CHUNK_TOKENS // max(T, 1))
    return [slice(i, min(i + rows, B)) for i in range(0, B, rows)]


class Engine:
    """What an attribution needs from a model; see the module docstring."""

    name = ""
    n_layers = 0

    def embed(self, ids: Sequence[int]) -> torch.Tensor:
        """The value at hook_embed [T d_model] of token ids (float32)."""
        raise NotImplementedError

    def mean_embedding(self) -> torch.Tensor:
        """The mean over the vocabulary of the value at hook_embed [d_model]."""
        raise NotImplementedError

    def run(self, X: torch.Tensor, readout: Readout | None = None, resid: bool = False):
        """No gradients. X [B T d] token embeddings -> (last-position logits [B d_vocab],
        f [B] or None, the residual entering every block [n_layers B T d] or None)."""
        raise NotImplementedError

    def grads(self, X: torch.Tensor, start: int, readout: Readout, weights: torch.Tensor):
        """X [B T d] entering block `start` (0: the embeddings), weights [B] ->
        (f [B] float64, sum_b w_b df/dX_b [T d] float64), chunked over rows."""
        f_all, total = [], None
        for s in _chunks(X.shape[0], X.shape[1]):
            f, g = self._grad_chunk(X[s], start, readout, weights[s])
            f_all.append(f.detach().double())
            total = g if total is None else total + g
        return torch.cat(f_all), total

    def _grad_chunk(self, X, start, readout, w):
        raise NotImplementedError

    def layer_grads(self, X: torch.Tensor, readout: Readout):
        """One forward and backward of X [1 T d] (embeddings): (f, the residual entering every
        block [n_layers T d], df/d(that residual) [n_layers T d]), float64."""
        raise NotImplementedError


class DenseEngine(Engine):
    """Fast path over canonical weights (kernels.forward.DenseModel's block, differentiated)."""

    name = "dense"

    def __init__(self, dm):
        self.dm = dm
        self.n_layers = dm.n_layers

    def embed(self, ids):
        with torch.no_grad():
            return self.dm.embed(torch.as_tensor(list(ids), dtype=torch.long, device=self.dm.W_U.device)).float()

    def mean_embedding(self):
        dm = self.dm
        with torch.no_grad():
            m = dm.W_E.double().mean(0)
            if dm.embed_scale is not None:
                m = m * dm.embed_scale.double()
        return m.float()

    def _blocks(self, h, start, keep=None):
        dm = self.dm
        for j in range(start, dm.n_layers):
            if keep is not None:
                keep.append(h)
            h = h + dm.attention(j, h, {}, {}, set())
            h = h + dm.mlp_dense(j, h, {}, {}, set())
        return h

    def _readout(self, h_last, readout):
        dm = self.dm
        ids = torch.as_tensor(readout.ids, device=h_last.device)
        sel = F.linear(dm.final_norm(h_last), dm.W_U[ids], None if dm.b_U is None else dm.b_U[ids])
        if dm.final_softcap:
            sel = torch.tanh(sel / dm.final_softcap) * dm.final_softcap
        return readout.from_selected(sel)

    def run(self, X, readout=None, resid=False):
        with torch.no_grad():
            keep = [] if resid else None
            h = self._blocks(X.to(self.dm.dtype), 0, keep)
            logits = self.dm.logits(h[:, -1])
            f = None if readout is None else readout.from_logits(logits).double()
        return logits, f, (torch.stack(keep) if resid else None)

    def _grad_chunk(self, X, start, readout, w):
        with torch.enable_grad():
            x = X.detach().to(self.dm.dtype).requires_grad_(True)
            h = self._blocks(x, start)
            f = self._readout(h[:, -1], readout)
            g, = torch.autograd.grad((f * w.to(f.dtype)).sum(), x)
        return f, g.double().sum(0)

    def layer_grads(self, X, readout):
        with torch.enable_grad():
            x = X.detach().to(self.dm.dtype).requires_grad_(True)
            keep = []
            h = self._blocks(x, 0, keep)
            f = self._readout(h[:, -1], readout)
            gs = torch.autograd.grad(f.sum(), keep)
        return (f.detach().double()[0], torch.stack([k.detach()[0] for k in keep]).double(),
                torch.stack([g[0] for g in gs]).double())


class HookEngine(Engine):
    """Reference path: hooked forwards of the LoadedModel (any architecture it runs)."""

    name = "hooks"

    def __init__(self, model, ids: Sequence[int]):
        self.model = model
        self.ids = list(ids)
        self.n_layers = model.info.n_layers

    def embed(self, ids):
        return self.model.capture([list(ids)], [EMBED])[EMBED][0].float().clone()   # not an inference tensor

    def mean_embedding(self):
        V = self.model.info.d_vocab
        total = None
        for i in range(0, V, 4096):   # one-token sequences: no position enters hook_embed
            col = torch.arange(i, min(i + 4096, V))[:, None]
            e = self.model.capture(col, [EMBED])[EMBED][:, 0].double().sum(0).clone()
            total = e if total is None else total + e
        return (total / V).float()

    def _replace(self, X):
        def put(act, hook):
            return X.to(act.dtype)
        return put

    def run(self, X, readout=None, resid=False):
        model = self.model
        names = [resid_pre(j) for j in range(self.n_layers)] if resid else []
        kept: dict = {}

        def keeper(name):
            def keep(act, hook):
                kept[name] = act.detach().clone()
            return keep
        ids = model.tensor([self.ids] * X.shape[0])
        hooks = [(EMBED, self._replace(X))] + [(n, keeper(n)) for n in names]
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            logits = model.forward(ids, logits_to_keep=1)[:, -1]
        f = None if readout is None else readout.from_logits(logits).double()
        return logits, f, (torch.stack([kept[n] for n in names]) if resid else None)

    def _grad_chunk(self, X, start, readout, w):
        model = self.model
        x = X.detach().float().requires_grad_(True)
        point = EMBED if start == 0 else resid_pre(start)
        ids = model.tensor([self.ids] * X.shape[0])
        with torch.enable_grad(), model.hooks(fwd_hooks=[(point, self._replace(x))]):
            logits = model.forward(ids, logits_to_keep=1)[:, -1]
            f = readout.from_logits(logits)
            g, = torch.autograd.grad((f * w.to(f.dtype)).sum(), x)
        return f, g.double().sum(0)

    def layer_grads(self, X, readout):
        model = self.model
        names = [resid_pre(j) for j in range(self.n_layers)]
        acts: dict = {}

        def keeper(name):
            def keep(act, hook):
                acts[name] = act
                return act
            return keep
        x = X.detach().float().requires_grad_(True)
        hooks = [(EMBED, self._replace(x))] + [(n, keeper(n)) for n in names]
        with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
            logits = model.forward(model.tensor([self.ids]), logits_to_keep=1)[:, -1]
            f = readout.from_logits(logits)
            gs = torch.autograd.grad(f.sum(), [acts[n] for n in names])
        return (f.detach().double()[0], torch.stack([acts[n].detach()[0] for n in names]).double(),
                torch.stack([g[0] for g in gs]).double())


def engine(model, ids: Sequence[int], prefer: str = "dense") -> Engine:
    """The dense engine when the model has canonical weights (and prefer == "dense"), else hooks."""
    if prefer == "dense":
        from .forward import dense_model

        dm = dense_model(model)
        if dm is not None and dm.dtype == torch.float32:
            return DenseEngine(dm)
    return HookEngine(model, ids)
