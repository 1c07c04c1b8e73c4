"""The one exception type of ``clip/`` for weights that cannot be found, read or understood."""
from __future__ import annotations


class CLIPLoadError(ValueError):
    """A CLIP weight file or download could not be used; the message names the file and what was expected."""
