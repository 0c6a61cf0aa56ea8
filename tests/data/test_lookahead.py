"""The CPU TensorSource's look-ahead thread (issue 22).

By default (``prefetch=None``) the source makes batches ahead in a thread only while torch runs
one intra-op thread: with several, a second thread running torch ops would hold a second OpenMP
pool, which slowed every parallel region of the training step. An explicit ``prefetch`` is kept
as given. Either way the batches are those of ``batch(key)``.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from spacedkd_fast.data import ArrayData, Augmenter, TensorSource

LOOKAHEAD = "spacedkd-prefetch"  # the look-ahead thread's name


def _source(prefetch=None) -> TensorSource:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    data = ArrayData(images, rng.integers(0, 10, 40), [str(i) for i in range(10)], "tiny")
    return TensorSource(data, Augmenter("cifar", 8, seed=1), batch_size=8, seed=2,
                        prefetch=prefetch)


def _lookahead_alive() -> bool:
    return any(t.name == LOOKAHEAD and t.is_alive() for t in threading.enumerate())


def _walk(batches):
    """(whether the look-ahead thread ran while the first batch was in hand, the batches)."""
    out, alive = [], None
    for item in batches:
        if alive is None:  # 5 batches, one made ahead: the thread is still working here
            alive = _lookahead_alive()
        out.append(item)
    return alive, out


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("n, expect_thread", [(1, True), (2, False)])
def test_auto_looks_ahead_only_with_one_intra_op_thread(threads, n, expect_thread):
    threads(n)
    src = _source()
    alive, streamed = _walk(src.epoch(0))
    assert alive is expect_thread
    assert [k for k, _ in streamed] == list(src.keys(0))
    for key, (x, y) in streamed:
        bx, by = src.batch(key)
        assert torch.equal(x, bx) and torch.equal(y, by)
    # a replay's run of keys follows the same rule and gives the same batches
    alive, replayed = _walk(src.batches([3, 1, 4, 2, 5]))
    assert alive is expect_thread
    for key, (x, y) in zip([3, 1, 4, 2, 5], replayed):
        assert torch.equal(x, src.batch(key)[0]) and torch.equal(y, src.batch(key)[1])


@pytest.mark.parametrize("n, prefetch", [(2, 1), (1, 0)])
def test_an_explicit_prefetch_is_kept(threads, n, prefetch):
    threads(n)
    alive, _ = _walk(_source(prefetch=prefetch).epoch(0))
    assert alive is (prefetch > 0)


def test_the_rule_is_read_at_each_epoch(threads):
    src = _source()
    threads(2)
    assert _walk(src.epoch(0))[0] is False
    threads(1)
    assert _walk(src.epoch(1))[0] is True
