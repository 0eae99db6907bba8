"""One module per analysis; importing this package registers them all with the runner."""

from . import attention, head_scores, prompt, token_lens  # noqa: F401
from . import massive  # noqa: F401
from . import features  # noqa: F401
from . import patching  # noqa: F401
from . import attribution  # noqa: F401
from . import neurons  # noqa: F401
