"""KeyedLoader as the engine's source: replays stream through the loader's worker pool
(``batches(keys)``, one run per replay), train the student on exactly the pixels that
``CopyReplay`` would have copied, hold a few bytes per sample, and a transform whose randomness
escapes the seeding is stopped at the first replay with one line naming the key, the cause and
the ``CopyReplay`` fallback."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from helpers.toys import ref_kd_loss, sgd  # noqa: F401
from torch import nn
from torch.utils.data import Dataset
from torchvision.transforms import v2

from spacedkd_fast.data import KeyedLoader
from spacedkd_fast.engine.distill import ReplayMismatchError, SpacedDistiller

N, B, CLASSES = 24, 8, 5  # L = 3

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


class Noisy(Dataset):
    """uint8 images ``[3, 8, 8]``, flipped at random and given noise from torch's and numpy's
    global generators. ``own_generator``: the numpy noise comes from the transform's own
    unseeded ``np.random.Generator`` instead (randomness that no key can bring back), made at
    first use in each process (``"lazy"``) or in ``__init__`` (``"init"``: forked workers start
    from copies of one state, so some batches come out alike by chance)."""

    def __init__(self, own_generator: str | None = None):
        g = torch.Generator().manual_seed(5)
        self.images = torch.randint(0, 256, (N, 3, 8, 8), dtype=torch.uint8, generator=g)
        self.flip = v2.Compose([v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True)])
        self.own_generator = own_generator
        self.rng = np.random.default_rng() if own_generator == "init" else None
        self.pid = os.getpid()

    def __len__(self) -> int:
        return N

    def _draw(self, size):
        if self.own_generator is None:
            return np.random.normal(size=size)
        if self.rng is None or (self.own_generator == "lazy" and self.pid != os.getpid()):
            self.rng, self.pid = np.random.default_rng(), os.getpid()
        return self.rng.normal(size=size)

    def __getitem__(self, i):
        x = self.flip(self.images[i]) + 0.1 * torch.randn(3, 8, 8)
        return x + torch.from_numpy(self._draw((3, 8, 8))).float() * 0.1, i % CLASSES


def tiny(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, CLASSES))


class Counting(KeyedLoader):
    """Counts how the engine asks for replayed batches."""

    calls = None

    def batch(self, key):
        self.calls["batch"] += 1
        return super().batch(key)

    def batches(self, keys):
        self.calls["batches"] += 1
        return super().batches(keys)


def train(loader, source, epochs: int = 2, **kw):
    teacher, student = tiny(0), tiny(1)
    d = SpacedDistiller(teacher, student, sgd(teacher), sgd(student), mode="spaced",
                        interval_rate=0.7, steps_per_epoch=loader.steps_per_epoch,
                        loss=ref_kd_loss, source=source, **kw)
    held = []
    for e in range(epochs):
        for key, (x, y) in loader.epoch(e):
            d.step(key, x, y)
            held.append(d.replay_buffer.bytes_per_sample())
    d.finish()
    return student, d, held


def test_replays_come_through_the_worker_pool_and_match_copies():
    loader = Counting(Noisy(), batch_size=B, seed=3, num_workers=2)
    loader.calls = {"batch": 0, "batches": 0}
    keyed_student, d, held = train(loader, loader)
    assert d.student_steps == d.teacher_steps == 2 * loader.steps_per_epoch
    # I = int(3 * 0.7) = 2: replays after steps 2, 4, 6, none left for the tail
    assert loader.calls == {"batch": 0, "batches": 3}
    assert 0 < max(held) <= 16  # bytes held per replayed sample (key + checksum per batch)
    # the reference: the same run keeping pixel copies of what the teacher trained on
    copy_student, _, copied = train(KeyedLoader(Noisy(), batch_size=B, seed=3), None)
    assert max(copied) > 3 * 8 * 8 * 4  # copies hold the pixels
    for a, b in zip(keyed_student.parameters(), copy_student.parameters()):
        assert torch.equal(a, b)


def assert_explained(err: ReplayMismatchError) -> None:
    msg = str(err)
    assert "\n" not in msg and f"for key {err.key} " in msg
    assert "np.random.Generator" in msg and "CUDA generator" in msg and "CopyReplay" in msg


@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_escaping_generator_is_stopped_at_the_first_replay(num_workers):
    loader = KeyedLoader(Noisy(own_generator="lazy"), batch_size=B, seed=3,
                         num_workers=num_workers)
    with pytest.raises(ReplayMismatchError) as err:
        train(loader, loader)
    assert err.value.key == 1  # the first batch of the first replay
    assert_explained(err.value)


def test_an_escape_alike_in_forked_workers_is_stopped_where_pixels_differ():
    """Workers forked from one generator state draw alike at first (those replays are the
    pixels trained on, and pass); the first batch that differs stops the run."""
    loader = KeyedLoader(Noisy(own_generator="init"), batch_size=B, seed=3, num_workers=2)
    with pytest.raises(ReplayMismatchError) as err:
        train(loader, loader)
    assert_explained(err.value)


def test_an_escape_found_by_a_deferred_check_says_the_same():
    loader = KeyedLoader(Noisy(own_generator="lazy"), batch_size=B, seed=3)
    teacher, student = tiny(0), tiny(1)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, fused=True) for m in (teacher, student)]
    d = SpacedDistiller(teacher, student, *opts, mode="spaced", interval_rate=0.7,
                        steps_per_epoch=loader.steps_per_epoch, loss=ref_kd_loss, source=loader,
                        check_finite_every=4)
    with pytest.raises(ReplayMismatchError) as err:
        for key, (x, y) in loader.epoch(0):
            d.step(key, x, y)
        d.finish()
    assert err.value.key == 1 and "found at a deferred check" in str(err.value)
    assert_explained(err.value)


def test_copy_replay_is_the_way_out_for_such_a_transform():
    loader = KeyedLoader(Noisy(own_generator="lazy"), batch_size=B, seed=3)
    _, d, _ = train(loader, None)
    assert d.student_steps == d.teacher_steps
