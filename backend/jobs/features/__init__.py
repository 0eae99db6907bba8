"""SAE features over the corpus: the index behind feature dashboards, the UMAP map and search.

    index.py   the corpus encoding job: windows of the corpus run ONCE through the model up to
               the deepest hooked layer, every SAE of the model encoded from that one forward
               (fused TopK kernel), sparse rows (feature, doc, pos, value, token) written chunk
               by chunk (backend/jobs/__init__.py, resumable); on finish two clustered copies, per-feature
               statistics and the top tokens. Also the weight-only tables (logit effects,
               similar decoder directions), and the keys: every table is keyed by the SAE id
               AND a hash of its weights file, so a retrained SAE never reads a stale index.
    query.py   the dashboard's reads (top examples with context, quantile-band examples,
               histogram, density, logit effects, similar features); plain functions, no torch.
    fmap.py    the UMAP map of the decoder directions (cosine), precomputed once per SAE.
    search.py  features by token (top examples or logit effects) and by text.

Position 0 of every window is left out of the index (its token is kept for context): it
carries the model's massive activations, and the SAEs were trained without it
(backend/train_sae.py). Densities are therefore fractions of the positions >= 1.
"""

from .index import (DEFAULT_WINDOWS, build_index, current_index, drop_index, ensure_weight_tables,
                    index_job_key, sae_key, weights_hash)
from .query import (IndexInfo, feature_dashboard, histogram, logit_effects, quantile_examples, similar_features,
                    stats, top_examples)

__all__ = ["DEFAULT_WINDOWS", "build_index", "current_index", "drop_index", "ensure_weight_tables",
           "index_job_key", "sae_key", "weights_hash", "IndexInfo", "feature_dashboard", "histogram",
           "logit_effects", "quantile_examples", "similar_features", "stats", "top_examples"]
