"""Test-wide fixtures: fixed seeds, the CUDA marker, and closeness checks that name the worst element."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _fixed_seeds():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def assert_close_worst(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float,
                       what: str = "") -> None:
    """Like torch.testing.assert_close in float64, but the message names the worst element."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if actual.numel() == 0:
        return
    err = (actual - expected).abs()
    allowed = atol + rtol * expected.abs()
    bad = ~(err <= allowed)
    if bad.any():
        excess = torch.where(bad, err - allowed, torch.zeros_like(err))
        excess = torch.nan_to_num(excess, nan=float("inf"))
        idx = np.unravel_index(int(excess.argmax()), tuple(err.shape)) if err.dim() else ()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.numel()} elements off; worst at {tuple(idx)}: "
            f"actual {actual[idx].item()!r}, expected {expected[idx].item()!r}, "
            f"|err| {err[idx].item():.3e} > atol {atol:.1e} + rtol {rtol:.1e} * |expected|"
        )
