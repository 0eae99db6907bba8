"""One module per analysis; importing this package registers them all with the runner."""

from . import attention, head_scores, prompt, token_lens  # noqa: F401
