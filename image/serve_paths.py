"""Path segments and query values of requests (and folder names of the registry) as the server
reads them: bounded and ASCII, so no Unicode digit aliases a version and no huge number reaches int()."""
from __future__ import annotations

MAX_VERSION_DIGITS = 18  # int64, as TF Serving's versions


def parse_version(text: str, canonical: bool = False) -> int | None:
    """A version number: ASCII digits only, at most 18 of them; anything else (``²``, ``١``, ``-1``,
    5000 digits) is None. ``canonical`` (folder names): no leading zeros either, so ``01`` is not 1.
    The registry's folder parse (mlflowctl/model_registry.py) follows the same rule."""
    if not (0 < len(text) <= MAX_VERSION_DIGITS and text.isascii() and text.isdigit()):
        return None
    if canonical and len(text) > 1 and text[0] == "0":
        return None
    return int(text)


def shown(segment: str, limit: int = 40) -> str:
    """A request's path segment as quoted in an error message (bounded)."""
    return segment if len(segment) <= limit else segment[:limit] + "..."
