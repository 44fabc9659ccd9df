"""The Examples sections of the public docstrings run and print what they say."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import spoc_xr

MODULES = sorted(info.name for info in pkgutil.iter_modules(spoc_xr.__path__, "spoc_xr."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_print_what_they_say(name: str) -> None:
    module = importlib.import_module(name)
    failed, attempted = doctest.testmod(module, verbose=False, report=True)
    assert failed == 0, f"{failed} of {attempted} examples in {name} failed"
