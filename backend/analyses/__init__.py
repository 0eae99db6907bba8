"""One module per analysis; importing this package registers them all with the runner."""

from . import (attention, attribution, features, head_scores, massive, neurons, patching,  # noqa: F401
               prompt, token_lens)
