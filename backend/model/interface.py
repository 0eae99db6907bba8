"""The one interface to a loaded model: every analysis, job and kernel goes through here.

A LoadedModel wraps TransformerLens's TransformerBridge (compatibility mode, no weight
processing) and its tokenizer. It returns results instead of holding state: token ids,
logits, activations at named hook points, gradients, generated ids. Nothing outside
backend/model touches the bridge (tests/test_boundaries.py checks it), so a new
architecture or a new wrapper is a change here, not in sixteen modules.

Hook names are the legacy TransformerLens names that backend/sites.py builds from typed
sites (`blocks.5.hook_resid_pre`, `blocks.23.attn.hook_z`, ...). A hook function has the
TransformerLens signature `fn(activation, hook) -> activation | None`.

Every forward takes `self.lock` (an RLock shared by every session of the process), so hooks
added by one run never leak into another.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from .. import settings
from ..errors import EmptyPrompt, PromptTooLong

Hook = tuple  # (name or name filter, fn(activation, hook))
_LAYER = re.compile(r"^blocks\.(\d+)\.")


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    source: str            # "packaged", "local" (a checkpoint folder: hf_name is the folder) or "hub"
    hf_name: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    prepend_bos: bool
    processing: str = "none"   # no fold_ln / centring: activations are Hugging Face's

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class _Captured(Exception):
    """Raised inside a forward once every wanted activation is in hand."""


class _Keeper:
    """One filter hook that keeps the activations of the wanted hook points (dispatching on the
    point's identity) and ends the forward once all have fired (when stop_early)."""

    def __init__(self, want: list[str], by_point: dict, flatten_heads: bool, stop_early: bool):
        self.want, self.by_point, self.got = want, by_point, {}
        self.flatten_heads, self.stop_early = flatten_heads, stop_early
        wanted = set(want)
        self.hook = (lambda n: n in wanted, self._keep)

    def _keep(self, x, hook):
        name = self.by_point.get(id(hook))
        if name is None:
            return None
        x = x.detach()
        self.got[name] = x.flatten(2) if (self.flatten_heads and x.ndim == 4) else x
        if self.stop_early and len(self.got) == len(self.want):
            raise _Captured
        return None

    def result(self) -> dict:
        lost = [n for n in self.want if n not in self.got]
        if lost:
            raise RuntimeError(f"hooks {lost} did not fire")
        return {n: self.got[n] for n in self.want}


def hook_layer(name: str) -> int | None:
    """The block index of a hook name (None for global hooks such as hook_embed)."""
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


class LoadedModel:
    """A model ready to run: tokenizer, forwards with hooks, captures, gradients, generation."""

    def __init__(self, info: ModelInfo, bridge, tokenizer):
        self.info = info
        self.bridge = bridge          # private to backend/model: use the methods below
        self.tokenizer = tokenizer
        self.lock = threading.RLock()
        self.load_seconds = 0.0

    # -- tokens -------------------------------------------------------------------------
    def encode(self, text: str, max_tokens: int | None = None) -> list[int]:
        """Token ids of a prompt, as every analysis sees them (BOS per the model's default)."""
        if not isinstance(text, str) or not text.strip():
            raise EmptyPrompt("The prompt is empty: type some text to analyse.")
        limit = settings.max_tokens() if max_tokens is None else max_tokens
        if len(text) > 40 * limit:  # no tokenizer gives fewer than one token per 40 chars
            raise PromptTooLong(f"The prompt is far over the limit of {limit} tokens "
                                f"({len(text)} characters).")
        ids = self.tokenize(text)
        if len(ids) > limit:
            raise PromptTooLong(f"The prompt has {len(ids)} tokens; the limit is {limit} "
                                "(DASHBOARD_MAX_TOKENS).")
        return ids

    def tokenize(self, text: str, prepend_bos: bool | None = None) -> list[int]:
        """Token ids with no checks (corpus text, pieces of prompts)."""
        bos = self.info.prepend_bos if prepend_bos is None else prepend_bos
        return self.bridge.to_tokens(text, prepend_bos=bos, truncate=False,
                                     move_to_device=False)[0].tolist()

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def str_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self.tokenizer.decode([i]) for i in ids]

    def chat_ids(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation in the model's own chat template (NoChatTemplate when its
        tokenizer has none, e.g. a base model from the hub)."""
        if not getattr(self.tokenizer, "chat_template", None):
            from ..errors import NoChatTemplate

            raise NoChatTemplate(f"{self.info.model_id} has no chat template (its tokenizer defines none), so "
                                 "chat-format prompts cannot be built for it: turn the chat option off, or use a "
                                 "model with a chat template.")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                 tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):   # BatchEncoding in newer transformers
            ids = ids["input_ids"]
        return [int(i) for i in ids]

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    def tensor(self, ids):
        """A [batch pos] long tensor on the model's device from one or several id lists."""
        import torch

        t = torch.as_tensor(ids, dtype=torch.long, device=settings.device())
        return t.unsqueeze(0) if t.ndim == 1 else t

    def _ids(self, ids):
        import torch

        return ids.to(settings.device()) if isinstance(ids, torch.Tensor) and ids.ndim == 2 else self.tensor(ids)

    # -- forwards -----------------------------------------------------------------------
    def hook_points(self) -> dict:
        """Hook name -> hook point (identity of a point tells a dispatching hook where it is)."""
        return self.bridge.hook_dict

    def logits(self, ids, **kw):
        """Logits [batch pos d_vocab] of a plain forward (no hooks). `logits_to_keep=1` keeps
        only the last position."""
        with self.lock:
            return self.bridge(self._ids(ids), **kw)

    def run_with_hooks(self, ids, fwd_hooks: Iterable[Hook] = (), return_type: str | None = "logits",
                       stop_at_layer: int | None = None, **kw):
        """A forward with hooks; `stop_at_layer` ends it before that block (no logits then)."""
        if stop_at_layer is not None:
            kw["stop_at_layer"] = stop_at_layer
        with self.lock:
            return self.bridge.run_with_hooks(self._ids(ids), fwd_hooks=list(fwd_hooks),
                                              return_type=return_type, **kw)

    def run_with_cache(self, ids, names: Iterable[str] | Callable[[str], bool] | None, **kw):
        """(logits, {hook name: activation}) for the named hooks (None: every hook point)."""
        if names is None or callable(names):
            flt = names
        else:
            wanted = set(names)
            flt = lambda n: n in wanted  # noqa: E731
        with self.lock:
            return self.bridge.run_with_cache(self._ids(ids), names_filter=flt, **kw)

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Iterable[Hook] = (), bwd_hooks: Iterable[Hook] = ()):
        """Hooks held for the duration of a block (for forwards and backwards with grads)."""
        with self.lock, self.bridge.hooks(fwd_hooks=list(fwd_hooks), bwd_hooks=list(bwd_hooks)):
            yield self

    def forward(self, ids, **kw):
        """A forward (gradients allowed) inside a `hooks()` block; returns logits."""
        return self.bridge(self._ids(ids), **kw)

    def loss(self, ids) -> float:
        """Mean next-token cross-entropy (nats) of a plain forward over ids [batch pos]."""
        with self.lock:
            return float(self.bridge(self._ids(ids), return_type="loss"))

    def tl_patching(self, function: str, base_ids, source_ids, metric, index_df=None):
        """TransformerLens's own patching function (`transformer_lens.patching.<function>`, e.g.
        get_act_patch_resid_pre) on this model: patches the source run's activations into the
        base run; `metric(logits)`. The reference the fast sweeps are tested and benchmarked
        against (it takes the bridge itself, which stays in here)."""
        import torch
        from transformer_lens import patching

        fn = getattr(patching, function)
        with self.lock, torch.inference_mode():
            _, cache = self.bridge.run_with_cache(self._ids(source_ids))
            if index_df is None:
                return fn(self.bridge, self._ids(base_ids), cache, metric)
            return fn(self.bridge, self._ids(base_ids), cache, metric, index_axis_names=None,
                      index_df=index_df)

    def hf_config(self):
        """The Hugging Face config of the model (read-only: exports that name the model's
        architecture in the field's own formats)."""
        return self.bridge.original_model.config

    def hf_model(self):
        """The wrapped Hugging Face model, for acceptance tests that compare against it
        (tests only: analyses and kernels use the methods above)."""
        return self.bridge.original_model

    def capture(self, ids, names: Sequence[str], flatten_heads: bool = False,
                stop_early: bool = True) -> dict:
        """Activations {hook name: tensor} at the named hooks from one forward that stops as
        soon as the deepest of them has fired (no later block, no unembedding runs).

        One filter hook dispatches on the hook point: the bridge rebuilds its alias table
        for each hook added by name (~7 ms each), which would dominate small captures.
        With flatten_heads, [batch pos head d_head] activations come back [batch pos head*d_head].
        """
        import torch

        keeper = self._keeper(names, flatten_heads, stop_early)
        with self.lock, torch.inference_mode():
            try:
                self.bridge.run_with_hooks(self._ids(ids), fwd_hooks=[keeper.hook], return_type=None)
            except _Captured:
                pass
        return keeper.result()

    def _keeper(self, names: Sequence[str], flatten_heads: bool = False, stop_early: bool = True) -> "_Keeper":
        from ..errors import InvalidSite

        want = list(dict.fromkeys(names))
        points = self.hook_points()
        missing = [n for n in want if n not in points]
        if missing:
            raise InvalidSite(f"Hooks {missing} do not exist in {self.info.model_id}.")
        return _Keeper(want, {id(points[n]): n for n in want}, flatten_heads, stop_early)

    # -- unembedding --------------------------------------------------------------------
    def final_norm(self, resid):
        return self.bridge.ln_final(resid)

    def unembed(self, normed):
        return self.bridge.unembed(normed)

    def logits_from_resid(self, resid):
        """Final norm then unembedding of residual-stream vectors [... d_model] → [... d_vocab].

        Applied to the last block's output this reproduces the model's logits exactly; applied
        to earlier layers it is the logit lens.
        """
        return self.bridge.unembed(self.bridge.ln_final(resid))

    def unembed_weights(self):
        """(W_U [d_vocab d_model], b_U [d_vocab] or None) as the model stores them."""
        u = self.bridge.unembed.original_component
        return u.weight, getattr(u, "bias", None)

    def final_norm_weight(self):
        """The final norm's scale [d_model] as stored (see weights() for its offset)."""
        return self.bridge.ln_final.original_component.weight

    def final_norm_scale(self):
        """What the final norm multiplies the normalised residual by [d_model]: the stored
        weight plus the norm's offset (Gemma's (1 + w)); the weight itself for Llama."""
        w = self.weights()
        return w.final_norm if not w.norm_offset else w.final_norm.float() + w.norm_offset

    def weights(self):
        """The canonical weights the fast kernels read (backend/model/weights.py), once per
        model; NotImplementedError for an architecture it does not describe."""
        if not hasattr(self, "_weights"):
            from .weights import read_weights

            try:
                self._weights = read_weights(self.bridge.original_model)
            except NotImplementedError as e:
                self._weights = e
        if isinstance(self._weights, NotImplementedError):
            raise self._weights
        return self._weights

    def W_O(self):
        """Attention output weights [layer head d_head d_model]."""
        return self.bridge.W_O

    def mlp_out_weight(self, layer: int):
        """Layer's MLP output matrix, nn.Linear layout [d_model d_mlp]."""
        return self.bridge.blocks[layer].mlp.out.weight

    # -- generation ---------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                 temperature: float = 0.0, seed: int = 0,
                 interventions: Sequence[tuple[str, Callable]] = (), use_cache: bool = True,
                 stop_at_eos: bool = True) -> list[list[int]]:
        """New token ids for each prompt (equal lengths; a batch), see generate.py."""
        from .generate import generate

        return generate(self, prompts, max_new_tokens, temperature=temperature, seed=seed,
                        interventions=interventions, use_cache=use_cache, stop_at_eos=stop_at_eos)

    # -- added by steer --
    def reference_hf_model(self):
        """A separate Hugging Face copy of this model (float32, eager attention), not wrapped
        by the bridge and sharing no tensor with it: for reference checks against
        `output_hidden_states` and for weight edits (orthogonalisation) on a copy. ~0.5 GB."""
        import torch
        from transformers import AutoModelForCausalLM

        from .registry import OFFLINE_MODELS, converted_dir

        m = OFFLINE_MODELS.get(self.info.model_id)
        path = str(converted_dir(m)) if m is not None else self.info.hf_name
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
        return hf.to(settings.device()).eval()
    # -- end steer --

    # -- added by scores --
    def run_from(self, layer: int, resid, names: Sequence[str], fwd_hooks: Iterable[Hook] = ()) -> dict:
        """Continue a forward from the residual stream entering block `layer`.

        `resid` [batch pos d_model] (positions 0..pos-1, no padding) runs through blocks
        layer.. with `fwd_hooks` held; returns {name: activation} at `names` (hooks of those
        blocks or of the final norm), stopping after the deepest of them. Earlier blocks never
        run, so many variants of the later computation from one captured resid_pre cost only
        the later blocks. Equal to a full forward (tests/test_feature_scores.py); the bridge
        has no start_at_layer, so the Hugging Face decoder runs from `inputs_embeds` with its
        layer list cut to [layer:] for the duration of the call (under the model's lock).
        """
        import torch

        from ..errors import InvalidSite

        inner = getattr(self.bridge.original_model, "model", None)
        layers = getattr(inner, "layers", None)
        if not isinstance(layers, torch.nn.ModuleList) or not 0 <= layer < len(layers):
            raise InvalidSite(f"Cannot start {self.info.model_id} at block {layer}.")
        keeper = self._keeper(names)
        hooks = list(fwd_hooks) + [keeper.hook]
        with self.lock, torch.inference_mode(), self.bridge.hooks(fwd_hooks=hooks):
            inner.layers = torch.nn.ModuleList(list(layers)[layer:])
            try:
                inner(inputs_embeds=resid, use_cache=False)
            except _Captured:
                pass
            finally:
                inner.layers = layers
        return keeper.result()
