"""numba compilation with the options every compiled kernel of spoc-xr uses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numba


def compiled(function: Callable[..., Any]) -> Any:
    """``function`` compiled by numba, releasing the GIL, with numpy's float semantics (a division
    by zero gives inf or NaN). The machine code is cached beside the package, or under
    ``NUMBA_CACHE_DIR``; where neither is writable (a read-only install) it is compiled once per
    process instead."""
    options: dict[str, Any] = {"nogil": True, "error_model": "numpy"}
    try:
        return numba.njit(cache=True, **options)(function)
    except RuntimeError:  # numba found no writable cache location
        return numba.njit(**options)(function)
