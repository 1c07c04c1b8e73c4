"""The one exception type of ``clip/`` for weights that cannot be found, read or understood."""
from __future__ import annotations


class CLIPLoadError(ValueError):
    """A CLIP weight file or download could not be used; the message names the file and what was expected."""


def short_reason(err: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message, shortened, to quote a library's cause inside our message."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."
