"""Checking settings where they are given, so that nonsense fails at once with the allowed range named."""

from __future__ import annotations

from typing import Any


def check_range(name: str, value: Any, allowed: str, ok: bool) -> None:
    """Raise ``ValueError("name=value: must be <allowed>")`` unless ``ok``, e.g.
    ``check_range("beta", beta, "> 0", beta > 0)``."""
    if not ok:
        raise ValueError(f"{name}={value!r}: must be {allowed}")
