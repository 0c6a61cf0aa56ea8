"""Fixtures of the trainer tests (helpers in run_helpers.py)."""

from __future__ import annotations

import pytest
from run_helpers import make_digits_bundle


@pytest.fixture(scope="session")
def digits_bundle():
    return make_digits_bundle()
