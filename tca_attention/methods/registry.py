"""Method registry: a new method is one file plus one entry here."""
from __future__ import annotations

from typing import Any, Callable

from .base import Method


def _tca(**kw: Any) -> Method:
    from .tca import TCA

    return TCA(**kw)


def _streaming(**kw: Any) -> Method:
    from .streaming import StreamingLLM

    return StreamingLLM(**kw)


def _full_budget(**kw: Any) -> Method:
    from .full import FullBudget

    return FullBudget(**kw)


# "full" is plain attention with no TCA hooks at all (the reference every method is compared to).
FACTORIES: dict[str, Callable[..., Method | None]] = {
    "full": lambda **kw: None,
    "tca": _tca,
    "streaming": _streaming,
    "full-budget": _full_budget,
}


def names() -> list[str]:
    return sorted(FACTORIES)


def create(name: str, **kwargs: Any) -> Method | None:
    if name not in FACTORIES:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(names())}")
    return FACTORIES[name](**kwargs)
