"""KeyedLoader: the replayable-source protocol over a user's Dataset, and bit-exact replay of the
user's own random transforms with DataLoader workers (0, 1, 4, out of order), after a resume, per
rank, and of what a transform draws from numpy and Python's ``random``.

References are independent of the loader: the three global generators' draws are compared with
fresh generator objects (``torch.Generator``, ``np.random.RandomState``, ``random.Random``)
seeded with ``sample_seeds``; epoch contents with ``sorted`` / ``arange``; ranks with rows of
the single-process batch; replays with the first pass of a loader with another worker count.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import random
import time

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, get_worker_info
from torchvision.transforms import v2

from spacedkd_fast.data import InvalidKeyError, KeyedLoader, StreamedSource
from spacedkd_fast.data.keyed import sample_seeds

N, B = 22, 6  # 4 batches per epoch, the last one of 4 samples

# more workers than this 2-core machine's CPUs is the point of some tests
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


class Images(Dataset):
    """``N`` fixed uint8 images ``[3, 20, 20]`` and a user's transform; item ``(x, index)``."""

    def __init__(self, transform=None, n: int = N):
        g = torch.Generator().manual_seed(1234)
        self.images = torch.randint(0, 256, (n, 3, 20, 20), dtype=torch.uint8, generator=g)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        x = self.images[i]
        return (self.transform(x) if self.transform is not None else x), i


def v2_transform(policy: str = "trivial"):
    """The issue's torchvision v2 cases: RandomResizedCrop, flip, a policy, RandomErasing."""
    auto = v2.TrivialAugmentWide() if policy == "trivial" else v2.RandAugment(num_ops=2)
    return v2.Compose([v2.RandomResizedCrop(16, antialias=True), v2.RandomHorizontalFlip(), auto,
                       v2.ToDtype(torch.float32, scale=True), v2.RandomErasing(p=0.5)])


def numpy_and_random(x):
    """A user transform that draws from numpy's and Python's global generators (and torch's)."""
    x = x.float() / 255
    shift = random.randint(0, 3)
    return (torch.roll(x, shift, dims=-1) + torch.from_numpy(np.random.normal(size=x.shape))
            .float() * 0.1 + torch.rand(()) * 0.01)


def epoch_list(loader, e, start=0):
    return [(k, b) for k, b in loader.epoch(e, start)]


def assert_same(a, b, what=""):
    assert len(a) == len(b), what
    for (ka, (xa, ya)), (kb, (xb, yb)) in zip(a, b):
        assert ka == kb, what
        assert torch.equal(xa, xb) and torch.equal(ya, yb), f"{what}: key {ka} differs"


def test_is_a_streamed_source_with_the_key_scheme():
    loader = KeyedLoader(Images(), batch_size=B)
    assert isinstance(loader, StreamedSource)
    assert len(loader) == loader.steps_per_epoch == 4
    assert loader.keys(1) == range(5, 9) and loader.keys(1, start=3) == range(8, 9)
    assert loader.key(2, 3) == 12 and loader.locate(12) == (2, 3)
    with pytest.raises(InvalidKeyError):
        loader.batch(0)
    with pytest.raises(ValueError, match="start"):
        list(loader.epoch(0, start=5))
    assert list(loader.epoch(0, start=4)) == []
    assert KeyedLoader(Images(), batch_size=B, drop_last=True).steps_per_epoch == 3


def test_each_epoch_is_a_permutation_and_unshuffled_is_file_order():
    loader = KeyedLoader(Images(), batch_size=B, seed=5)
    orders = [torch.cat([y for _, (_, y) in loader.epoch(e)]) for e in range(2)]
    for order in orders:
        assert sorted(order.tolist()) == list(range(N))
    assert not torch.equal(orders[0], orders[1])
    plain = KeyedLoader(Images(), batch_size=B, shuffle=False)
    assert torch.cat([y for _, (_, y) in plain.epoch(3)]).tolist() == list(range(N))
    dropped = KeyedLoader(Images(), batch_size=B, drop_last=True)
    assert [len(y) for _, (_, y) in dropped.epoch(0)] == [B, B, B]


class Draws(Dataset):
    """Item ``i``: what torch's, numpy's and Python's global generators give (no image), and the
    index; float64 so that every draw is kept exactly."""

    def __len__(self) -> int:
        return N

    def __getitem__(self, i):
        t = torch.rand(2, dtype=torch.float64)
        n = torch.from_numpy(np.random.rand(2))
        p = torch.tensor([random.random()], dtype=torch.float64)
        return torch.cat([t, n, p]), i


@pytest.mark.parametrize("num_workers", [0, 2])
def test_each_sample_draws_from_generators_seeded_by_seed_stream_key_position(num_workers):
    seed = 77
    for stream in (0, 1):
        loader = KeyedLoader(Draws(), batch_size=B, seed=seed,
                             num_workers=num_workers).stream(stream)
        for key, (x, _) in loader.epoch(1):
            for pos in range(len(x)):
                ts, ns, ps = sample_seeds(seed, stream, key, pos)
                want = torch.cat([
                    torch.rand(2, dtype=torch.float64, generator=torch.Generator().manual_seed(ts)),
                    torch.from_numpy(np.random.RandomState(ns).rand(2)),
                    torch.tensor([random.Random(ps).random()], dtype=torch.float64)])
                assert torch.equal(x[pos], want), (stream, key, pos)


def test_sample_seeds_differ_across_everything_they_depend_on():
    base = sample_seeds(1, 0, 5, 0)
    others = [sample_seeds(2, 0, 5, 0), sample_seeds(1, 1, 5, 0), sample_seeds(1, 0, 6, 0),
              sample_seeds(1, 0, 5, 1)]
    for o in others:
        assert all(a != b for a, b in zip(base, o))
    ts, ns, ps = base
    assert len({ts, ns, ps}) == 3 and 0 <= ns < 2 ** 32 and 0 <= ts < 2 ** 63


@pytest.fixture(scope="module")
def trivial_reference():
    """The first pass over epochs 0 and 1 in this process (no workers): the reference."""
    loader = KeyedLoader(Images(v2_transform()), batch_size=B, seed=3)
    return [epoch_list(loader, e) for e in range(2)]


@pytest.mark.parametrize("num_workers", [0, 1, 4])
def test_v2_transforms_replay_bit_exactly_with_workers(num_workers, trivial_reference):
    loader = KeyedLoader(Images(v2_transform()), batch_size=B, seed=3, num_workers=num_workers)
    first = [epoch_list(loader, e) for e in range(2)]
    for got, ref in zip(first, trivial_reference):
        assert_same(got, ref, f"{num_workers} workers")
    everything = [kb for ep in trivial_reference for kb in ep]
    for key, (x, y) in everything[::3]:
        x2, y2 = loader.batch(key)
        assert torch.equal(x2, x) and torch.equal(y2, y)
    # the engine's replay path: a run of keys, in another order than they were trained in
    keys = [k for k, _ in everything][::-1]
    replayed = list(loader.batches(keys))
    assert_same(list(zip(keys, replayed)), everything[::-1], "batches(keys)")


def test_the_transforms_really_draw(trivial_reference):
    """Without this, equal replays could come from a transform that draws nothing."""
    seen: dict[int, list[torch.Tensor]] = {}
    for ep in trivial_reference:
        for _, (x, y) in ep:
            for row, i in enumerate(y.tolist()):
                seen.setdefault(i, []).append(x[row])
    assert all(len(v) == 2 for v in seen.values())
    assert sum(not torch.equal(a, b) for a, b in seen.values()) == N


def test_randaugment_replays_with_workers():
    ref = KeyedLoader(Images(v2_transform("rand")), batch_size=B, seed=9)
    loader = KeyedLoader(Images(v2_transform("rand")), batch_size=B, seed=9, num_workers=2)
    assert_same(epoch_list(loader, 0), epoch_list(ref, 0), "RandAugment")
    assert_same([(k, loader.batch(k)) for k in ref.keys(0)], epoch_list(ref, 0), "batch(key)")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_transform_drawing_from_numpy_and_random_replays(num_workers):
    data = Images(numpy_and_random)
    ref = epoch_list(KeyedLoader(data, batch_size=B, seed=4), 2)
    loader = KeyedLoader(data, batch_size=B, seed=4, num_workers=num_workers)
    assert_same(epoch_list(loader, 2), ref)
    assert_same([(k, b) for k, b in zip(loader.keys(2), loader.batches(loader.keys(2)))], ref)


class SlowRandomOrder(Images):
    """Each load sleeps for a time from the OS's entropy (outside every seeded generator), so
    workers finish in any order; the item says which worker loaded it."""

    def __getitem__(self, i):
        time.sleep(int.from_bytes(os.urandom(1), "little") / 255 * 0.004)
        x, i = super().__getitem__(i)
        info = get_worker_info()
        return x, i, -1 if info is None else info.id


def test_workers_finishing_in_any_order_give_the_same_batches():
    data = SlowRandomOrder(v2_transform())
    ref = KeyedLoader(data, batch_size=B, seed=8)
    loader = KeyedLoader(data, batch_size=B, seed=8, num_workers=3)
    want = {k: ref.batch(k) for k in ref.keys(0)}
    workers = set()
    for k, (x, y, w) in loader.epoch(0):
        assert torch.equal(x, want[k][0]) and torch.equal(y, want[k][1])
        workers |= set(w.tolist())
    assert len(workers) > 1  # the batches really came from several workers
    for k, (x, y, _) in zip(reversed(ref.keys(0)), loader.batches(reversed(ref.keys(0)))):
        assert torch.equal(x, want[k][0]) and torch.equal(y, want[k][1])


def test_resume_mid_epoch_gives_the_uninterrupted_batches(trivial_reference):
    # a new loader (a resumed process) with workers, started at batch 2 of epoch 1
    resumed = KeyedLoader(Images(v2_transform()), batch_size=B, seed=3, num_workers=2)
    assert_same(epoch_list(resumed, 1, start=2), trivial_reference[1][2:], "resume")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_each_rank_takes_rows_of_the_global_batch(num_workers):
    data = Images(v2_transform())
    whole = KeyedLoader(data, batch_size=B, seed=6)
    ranks = [KeyedLoader(data, batch_size=B, seed=6, rank=r, world_size=2,
                         num_workers=num_workers) for r in range(2)]
    for r, loader in enumerate(ranks):
        assert loader.steps_per_epoch == whole.steps_per_epoch
        for key, (x, y) in loader.epoch(0):
            gx, gy = whole.batch(key)
            assert torch.equal(x, gx[r::2]) and torch.equal(y, gy[r::2]), (r, key)


def test_loading_in_this_process_leaves_the_callers_generators_alone():
    def draws():
        return torch.rand(3), np.random.rand(3), random.random()

    def seeded():
        torch.manual_seed(11)
        np.random.seed(11)
        random.seed(11)

    seeded()
    want = draws()
    loader = KeyedLoader(Images(numpy_and_random), batch_size=B)
    seeded()
    list(loader.epoch(0))
    loader.batch(3)
    list(loader.batches([2, 1]))
    got = draws()
    assert torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and got[2] == want[2]


def test_streams_draw_independently_and_replay():
    loader = KeyedLoader(Images(v2_transform()), batch_size=B, seed=2, num_workers=2)
    s1 = loader.stream(1)
    assert s1.stream_id == 1 and loader.stream(0) is loader and s1.stream(1) is s1
    e0, e1 = epoch_list(loader, 0), epoch_list(s1, 0)
    assert [k for k, _ in e0] == [k for k, _ in e1]
    assert not torch.equal(e0[0][1][1], e1[0][1][1])  # another order
    assert_same([(k, s1.batch(k)) for k, _ in e1], e1, "stream 1")


def test_persistent_workers_and_an_epoch_inside_an_epoch():
    data = Images(v2_transform())
    ref = KeyedLoader(data, batch_size=B, seed=1)
    loader = KeyedLoader(data, batch_size=B, seed=1, num_workers=2, persistent_workers=True,
                         prefetch_factor=1)
    want = {e: epoch_list(ref, e) for e in range(3)}
    for e in range(2):
        got = []
        for key, batch in loader.epoch(e):
            got.append((key, batch))
            if len(got) == 2:  # a replay and another epoch while this one is running
                assert_same(list(zip(ref.keys(2), loader.batches(ref.keys(2)))), want[2])
                assert_same(epoch_list(loader, 2), want[2], "nested epoch")
        assert_same(got, want[e], f"epoch {e}")


def test_iterating_the_loader_walks_the_next_epoch():
    loader = KeyedLoader(Images(), batch_size=B, seed=1)
    assert [k for k, _ in loader] == list(loader.keys(0))
    assert [k for k, _ in loader] == list(loader.keys(1))
    loader.set_epoch(5)
    assert [k for k, _ in loader] == list(loader.keys(5))


def test_collate_fn_runs_seeded():
    cutmix = v2.CutMix(num_classes=N)

    def collate(samples):
        x = torch.stack([s[0] for s in samples]).float()
        y = torch.tensor([s[1] for s in samples])
        return cutmix(x, y)

    ref = KeyedLoader(Images(), batch_size=B, seed=1, collate_fn=collate)
    loader = KeyedLoader(Images(), batch_size=B, seed=1, collate_fn=collate, num_workers=2)
    first = epoch_list(loader, 0)
    assert first[0][1][1].dtype == torch.float32  # mixed soft labels: CutMix ran
    assert_same([(k, ref.batch(k)) for k, _ in first], first, "CutMix in collate_fn")


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="num_workers"):
        KeyedLoader(Images(), num_workers=-1)
    for bad in (None, 0, 2.5):
        with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
            KeyedLoader(Images(), batch_size=bad)
    with pytest.raises(ValueError, match="persistent_workers"):
        KeyedLoader(Images(), persistent_workers=True)
    with pytest.raises(TypeError, match="map-style"):
        KeyedLoader(iter(range(3)))
    with pytest.raises(ValueError, match="empty"):
        KeyedLoader(Images(n=0))
    with pytest.raises(ValueError, match="last batch .* 1 sample.*world_size 2.*drop_last"):
        KeyedLoader(Images(n=13), batch_size=4, rank=1, world_size=2)
    assert KeyedLoader(Images(n=13), batch_size=4, rank=1, world_size=2,
                       drop_last=True).steps_per_epoch == 3


@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is not installed")
def test_timm_create_transform_replays_with_workers():
    from PIL import Image
    from timm.data import create_transform

    tf = create_transform(16, is_training=True, auto_augment="rand-m9-mstd0.5-inc1",
                          re_prob=0.5, hflip=0.5)

    def pil_then_timm(x):
        return tf(Image.fromarray(x.permute(1, 2, 0).numpy()))

    data = Images(pil_then_timm)
    ref = KeyedLoader(data, batch_size=B, seed=12)
    loader = KeyedLoader(data, batch_size=B, seed=12, num_workers=2)
    first = epoch_list(loader, 0)
    assert_same([(k, ref.batch(k)) for k, _ in first], first, "timm")
    assert_same(list(zip(ref.keys(0), loader.batches(ref.keys(0)))), first, "timm batches")


def test_torchvision_image_folder_replays_with_workers(tmp_path):
    from PIL import Image
    from torchvision.datasets import ImageFolder

    rng = np.random.RandomState(0)
    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for j in range(5):
            Image.fromarray(rng.randint(0, 256, (10 + j, 12, 3), dtype=np.uint8)).save(
                tmp_path / c / f"{j}.png")
    tf = v2.Compose([v2.PILToTensor(), v2.RandomResizedCrop(8, antialias=True),
                     v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True)])
    data = ImageFolder(str(tmp_path), transform=tf)
    ref = KeyedLoader(data, batch_size=4, seed=2)
    loader = KeyedLoader(data, batch_size=4, seed=2, num_workers=2)
    first = epoch_list(loader, 1)
    assert sorted(torch.cat([y for _, (_, y) in first]).tolist()) == [0] * 5 + [1] * 5
    assert_same([(k, ref.batch(k)) for k, _ in first], first, "ImageFolder")


class DictItems(Dataset):
    """Items as a Hugging Face ``datasets.Dataset`` gives them after ``with_transform``."""

    def __len__(self) -> int:
        return N

    def __getitem__(self, i):
        return {"pixel_values": torch.rand(3, 4, 4), "label": i % 3}


def dict_collate(items):
    return (torch.stack([it["pixel_values"] for it in items]),
            torch.tensor([it["label"] for it in items]))


def test_dict_items_with_a_collate_fn_replay():
    ref = KeyedLoader(DictItems(), batch_size=B, seed=1, collate_fn=dict_collate)
    loader = KeyedLoader(DictItems(), batch_size=B, seed=1, collate_fn=dict_collate,
                         num_workers=2)
    first = epoch_list(loader, 0)
    assert first[0][1][0].shape == (B, 3, 4, 4)
    assert_same([(k, ref.batch(k)) for k, _ in first], first, "dict items")


class ImagesOnly(Dataset):
    """A common slip: ``__getitem__`` returns the image without its label."""

    def __len__(self) -> int:
        return N

    def __getitem__(self, i):
        return torch.zeros(3, 4, 4)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_items_that_are_not_pairs_are_one_line_naming_the_fix(num_workers):
    from spacedkd_fast.data.user_sets import BadDataError

    loader = KeyedLoader(ImagesOnly(), batch_size=B, num_workers=num_workers)
    with pytest.raises(BadDataError) as err:
        next(iter(loader.epoch(0)))
    text = str(err.value)
    assert "\n" not in text and "must be an (image, label) pair, got Tensor" in text
    assert "collate_fn" in text
    # the workers are stopped with the error, not when the garbage collector frees the iterator
    # the error's traceback holds (torch's iterator then waits 5 s per worker)
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize("persistent", [False, True])
def test_a_worker_error_stops_the_workers_and_the_loader_still_works(persistent):
    class FailsWhileTold(Dataset):
        fail = True  # copied into the workers when they start

        def __len__(self) -> int:
            return N

        def __getitem__(self, i):
            if self.fail and i == 0:
                raise ValueError("sample 0 fails")
            return torch.full((2,), float(i)), i

    data = FailsWhileTold()
    loader = KeyedLoader(data, batch_size=B, num_workers=2, persistent_workers=persistent)
    with pytest.raises(ValueError, match="sample 0 fails"):
        list(loader.epoch(0))
    assert multiprocessing.active_children() == []
    data.fail = False
    with loader:
        again = [y.tolist() for _, (_, y) in loader.epoch(0)]  # fresh workers take the epoch
        assert sorted(i for ys in again for i in ys) == list(range(N))
        assert [y.tolist() for _, y in loader.batches([1, 2])] == again[:2]
    # closed: no worker outlives the block, persistent or not, the replay pool's included
    assert multiprocessing.active_children() == []
    assert [y.tolist() for _, (_, y) in loader.epoch(0)] == again  # usable after close
    loader.close()
