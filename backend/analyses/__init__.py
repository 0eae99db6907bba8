"""One module per analysis; importing this package registers them all with the runner."""

from . import (acdc, atp_star, attention, attribution, circuits, das, features, graph, graph_intervention,  # noqa: F401
               head_scores, illusion, massive, neurons, patching, prompt, token_attribution, token_lens)
from .probes import clue, harm_refusal, saplma, tcav  # noqa: F401  (the probe studies of `probe-study`)
