"""The objects the in-process tests hand to the code under test, built once from this run's environment (set
by tests/conftest.py before the first use), exactly as a service's composition root builds them."""

from __future__ import annotations

import functools

from shared.bootstrap import Components, build_components
from shared.core.config import load_settings


@functools.cache
def components() -> Components:
    return build_components(load_settings())
