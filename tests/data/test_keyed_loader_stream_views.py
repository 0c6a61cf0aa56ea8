"""KeyedLoader.stream(s) builds each stream's view once: the engine's ``replay="fresh"`` asks for
``source.stream(1)`` at every catch-up, and a new view each time meant new worker pools (a
process start per catch-up). The views hold no reference cycle with their loader (a loader
nobody holds is freed at once, its workers with it) and are not pickled."""

from __future__ import annotations

import pickle
import weakref

import pytest
import torch
from helpers.toys import ref_kd_loss, sgd
from torch import nn
from torch.utils.data import Dataset

from spacedkd_fast.data import KeyedLoader
from spacedkd_fast.engine.distill import SpacedDistiller

N, B, CLASSES = 24, 8, 5  # L = 3

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


class Flips(Dataset):
    """Fixed float images ``[3, 4, 4]``, each flipped by torch's global generator."""

    def __init__(self):
        self.images = torch.randn(N, 3, 4, 4, generator=torch.Generator().manual_seed(2))

    def __len__(self) -> int:
        return N

    def __getitem__(self, i):
        x = self.images[i]
        return (x.flip(-1) if torch.rand(()) < 0.5 else x), i % CLASSES


class Counting(KeyedLoader):
    """Records every DataLoader (worker pool) it makes and every epoch asked of it, by stream."""

    def __init__(self, *args, log: list, **kw):
        self.log = log
        super().__init__(*args, **kw)

    def _data_loader(self, plan, keep):
        self.log.append(("pool", self.stream_id, keep))
        return super()._data_loader(plan, keep)

    def epoch(self, epoch, start=0):
        self.log.append(("epoch", self.stream_id, epoch))
        return super().epoch(epoch, start)


def test_each_stream_view_is_built_once_and_shared_by_the_views():
    loader = KeyedLoader(Flips(), batch_size=B, seed=1)
    s1 = loader.stream(1)
    assert s1.stream_id == 1 and loader.stream(1) is s1 and s1.stream(1) is s1
    assert s1.stream(0) is loader and loader.stream(0) is loader
    s2 = s1.stream(2)
    assert s2 is loader.stream(2) and s2.stream(1) is s1 and s2.stream_id == 2
    # the cached view still draws its own stream: equal to a fresh loader's view of stream 1
    fresh = KeyedLoader(Flips(), batch_size=B, seed=1).stream(1)
    for (k, (x, y)), (k2, (x2, y2)) in zip(s1.epoch(0), fresh.epoch(0)):
        assert k == k2 and torch.equal(x, x2) and torch.equal(y, y2)
    # a pickled loader carries no views (nor pools): it builds its own
    back = pickle.loads(pickle.dumps(loader))
    assert back.stream(1) is back.stream(1) and back.stream(1) is not s1
    assert back.stream(1).stream(0) is back


def test_a_loader_nobody_holds_is_freed_without_the_garbage_collector():
    import gc

    gc.disable()
    try:
        loader = KeyedLoader(Flips(), batch_size=B, seed=1)
        view = loader.stream(1)
        gone = weakref.ref(loader)
        del loader
        assert gone() is None  # no cycle through the view cache
        assert view.stream(1) is view and view.stream(0).stream_id == 0
    finally:
        gc.enable()


def test_fresh_catch_ups_reuse_stream_1s_workers():
    log: list = []
    loader = Counting(Flips(), batch_size=B, seed=3, num_workers=1, persistent_workers=True,
                      log=log)
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(48, CLASSES))
    student = nn.Sequential(nn.Flatten(), nn.Linear(48, CLASSES))
    d = SpacedDistiller(teacher, student, sgd(teacher), sgd(student), mode="spaced",
                        interval_rate=0.7, steps_per_epoch=loader.steps_per_epoch,
                        loss=ref_kd_loss, source=loader, replay="fresh")
    for e in range(4):
        for key, (x, y) in loader.epoch(e):
            d.step(key, x, y)
    d.finish()
    catch_up_passes = [entry for entry in log if entry[:2] == ("epoch", 1)]
    assert len(catch_up_passes) >= 3 and d.student_steps > 0
    # one persistent pool for stream 1's epochs over every catch-up, one for stream 0's
    assert [entry for entry in log if entry[0] == "pool"] == [("pool", 0, True), ("pool", 1, True)]
