"""Say which names were not understood, with the close matches a typo most likely meant.

Pure Python (difflib), importing nothing of the project: the `flwr run` driver checks a
run-config's keys with it before it imports torch or starts a SuperLink, and `RunConfig` names
unknown keys with the same words.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def close_matches(name: str, valid: Iterable[str]) -> list[str]:
    """Up to three valid names closest to `name` (difflib's ratio >= 0.6), best first."""
    return difflib.get_close_matches(name, list(valid), n=3, cutoff=0.6)


def unknown_names(what: str, unknown: Iterable[str], valid: Iterable[str]) -> str:
    """`unknown run-config key 'num-round' (did you mean 'num-rounds'?); valid keys: ...`.

    `what` names the kind of name ("run-config key"); every unknown name gets its own close
    matches, and the valid names follow, sorted, so the message also serves a name with none."""
    choices = sorted(set(valid))
    parts = []
    for name in sorted(set(unknown)):
        near = close_matches(name, choices)
        hint = f" (did you mean {' or '.join(repr(n) for n in near)}?)" if near else ""
        parts.append(f"{name!r}{hint}")
    plural = "s" if len(parts) > 1 else ""
    return f"unknown {what}{plural} {', '.join(parts)}; valid {what}s: {', '.join(choices)}"
