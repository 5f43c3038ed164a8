"""The one check of a method's parameters, shared by the text halting methods and the image exit methods."""

from __future__ import annotations

from typing import Mapping, Sequence


def check_method_params(method: str, params: Mapping, table: Mapping[str, Sequence[str]]) -> None:
    """Raise ``ValueError`` naming the problem and the fix when ``method`` is not in ``table`` (method -> its
    parameter names) or ``params`` holds a key that is not one of ``method``'s parameters."""
    if method not in table:
        raise ValueError(f"unknown method {method!r}; choose one of {list(table)}")
    for key in params:
        if key not in table[method]:
            owners = [m for m, keys in table.items() if key in keys]
            if not owners:
                raise ValueError(f"unknown parameter {key!r}; the parameters are "
                                 f"{sorted({k for v in table.values() for k in v})}")
            raise ValueError(f"{key} is a parameter of method {' and '.join(map(repr, owners))}, not of {method!r}; "
                             f"drop it or pick --method {owners[0]}")
