"""One module per analysis; importing this package registers them all with the runner."""

from . import (atp_star, attention, attribution, circuits, features, graph, graph_intervention, head_scores, massive, neurons, patching,  # noqa: F401
               prompt, token_attribution, token_lens)
