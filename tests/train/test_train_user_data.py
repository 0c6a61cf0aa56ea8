"""The trainer on a user's own Datasets: ``spacedkd_fast.train.run(config, train_set=...,
test_set=...)`` and ``--dataset MODULE:FUNCTION``; spaced replay through the KeyedLoader (the
engine checks every replayed batch against its checksum), and bad data as one line, exit 2."""

from __future__ import annotations

import json
import multiprocessing
import sys
import textwrap

import pytest
import torch

from spacedkd_fast.train import cli
from spacedkd_fast.train.config import build_config
from spacedkd_fast.train.errors import UserError

TINY = dict(arch="resnet18", model_kwargs={"downsample_factor": 64}, batch_size=16, lr=0.05,
            device="cpu", log_every=2, seed=0, epochs=2, mode="spaced", interval_rate=0.5)
TINY_FLAGS = ["--arch", "resnet18", "--model-kwargs", "downsample_factor=64", "--batch-size",
              "16", "--device", "cpu", "--epochs", "1", "--interval-rate", "0.5", "--no-progress"]

# a user's module: 64 random 8 px images whose label is the brightest channel (learnable), a
# random flip through torch's global generator (replayed exactly by the keyed loader)
USER_MODULE = textwrap.dedent('''
    import torch

    class Bright(torch.utils.data.Dataset):
        classes = ["r", "g", "b"]

        def __init__(self, n, seed, bad=None):
            g = torch.Generator().manual_seed(seed)
            self.x = torch.rand(n, 3, 8, 8, generator=g)
            self.y = self.x.mean((2, 3)).argmax(1)
            self.bad = bad or {}

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            if i in self.bad:
                return self.bad[i]
            x = self.x[i]
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
            return x, int(self.y[i])

    def sets(image_size=None):
        return Bright(64, 0), Bright(32, 1)

    def empty():
        return Bright(0, 0), Bright(32, 1)

    def not_pairs():
        return Bright(64, 0, bad={i: torch.zeros(3, 8, 8) for i in range(64)}), Bright(32, 1)

    def bad_label():
        return Bright(64, 0, bad={0: (torch.zeros(3, 8, 8), 3)}), Bright(32, 1)

    def late_bad_label():  # item 1 is not among the probed items: a worker meets it mid-epoch
        return Bright(64, 0, bad={1: (torch.zeros(3, 8, 8), 7)}), Bright(32, 1)

    def mixed_sizes():
        return Bright(64, 0, bad={8: (torch.zeros(3, 9, 9), 0)}), Bright(32, 1)

    class Unkeyed(Bright):
        """A transform drawing from the OS's entropy: no seeding can replay it."""

        def __getitem__(self, i):
            import os
            x, y = super().__getitem__(i)
            return x + os.urandom(1)[0] / 255, y

    def unkeyed():
        return Unkeyed(64, 0), Bright(32, 1)
''')


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_user_sets.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_user_sets", None)
    import my_user_sets

    yield my_user_sets
    sys.modules.pop("my_user_sets", None)


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_run_from_python_trains_spaced_kd_with_keyed_replay(tmp_path, user_module):
    from spacedkd_fast.train import run

    out = tmp_path / "run"
    status = run({**TINY, "epochs": 1, "out": str(out)}, train_set=user_module.Bright(64, 0),
                 test_set=user_module.Bright(32, 1), num_workers=1, progress=False)
    assert status == 0
    got = rows(out)
    assert len(got) == 1
    # the student replayed (every replay is checked against the checksum of the batch the
    # teacher saw, so a replay that differed would have stopped the run)
    assert got[-1]["student_steps"] > 0 and got[-1]["teacher_steps"] == 4
    assert "from-python:Bright" in (out / "config.yaml").read_text()
    # resume from Python, extended by an epoch, with the same sets (fresh objects)
    status = run({"epochs": 2}, resume=str(out), train_set=user_module.Bright(64, 0),
                 test_set=user_module.Bright(32, 1), num_workers=0, progress=False)
    assert status == 0
    got = rows(out)
    assert len(got) == 2 and got[-1]["teacher_steps"] == 8
    assert got[-1]["student_steps"] > got[0]["student_steps"]


def test_a_run_stops_its_loaders_workers_while_the_loader_is_still_held(tmp_path, user_module):
    # a loader still referenced after the run (by a caller, or by a reference cycle the garbage
    # collector frees later, with a 5 s stall per worker) keeps no workers
    from spacedkd_fast.train.config import build_config
    from spacedkd_fast.train.runner import train
    from spacedkd_fast.train.user_data import UserSets

    held = []

    class Kept(UserSets):
        def __call__(self, cfg, info):
            held.append(super().__call__(cfg, info))
            return held[-1]

    cfg = build_config(None, {**TINY, "epochs": 1, "out": str(tmp_path / "run")})
    data = Kept(user_module.Bright(64, 0), user_module.Bright(32, 1), num_workers=1)
    assert train(cfg, progress=False, data=data) == 0
    assert held and held[0].train.persistent_workers
    assert multiprocessing.active_children() == []


def test_run_from_python_refuses_bad_data_in_one_line(tmp_path, user_module):
    from spacedkd_fast.train import run

    with pytest.raises(UserError, match=r"^data: the training set is empty \(len 0\)$"):
        run({**TINY, "out": str(tmp_path / "r")}, train_set=user_module.Bright(0, 0),
            test_set=user_module.Bright(8, 1), num_workers=0, progress=False)
    assert not (tmp_path / "r").exists()  # a refused run leaves no empty folder


def test_cli_module_factory_trains(tmp_path, user_module, capsys):
    out = tmp_path / "cli"
    status = cli.main(["--dataset", "my_user_sets:sets", "--out", str(out), *TINY_FLAGS])
    assert status == 0, capsys.readouterr().err
    assert "data set my_user_sets:sets: 64 train / 32 test images, 3 classes" in capsys.readouterr().out
    assert rows(out)[-1]["student_steps"] > 0
    # --resume rebuilds the sets from the saved MODULE:FUNCTION by itself
    assert cli.main(["--resume", str(out), "--epochs", "2", "--no-progress"]) == 0
    got = rows(out)
    assert len(got) == 2 and got[-1]["teacher_steps"] == 8


@pytest.mark.parametrize("factory, message", [
    ("empty", "the training set is empty (len 0)"),
    ("not_pairs", "training set item 0: a Dataset item must be an (image, label) pair, got Tensor"),
    ("bad_label", "training set item 0: label 3 is outside [0, 3)"),
    ("late_bad_label", "label 7 is outside [0, 3)"),
    ("mixed_sizes", "training set item 8: image of size 3x9x9, but training set item 0 is 3x8x8"),
    # caught by the engine's checksum at the first replay, never trained on silently
    ("unkeyed", "the source gave back a different batch for key 1"),
])
def test_cli_bad_data_is_one_line_and_exit_2(tmp_path, user_module, capsys, factory, message):
    status = cli.main(["--dataset", f"my_user_sets:{factory}", "--out", str(tmp_path / "o"),
                       *TINY_FLAGS])
    err = capsys.readouterr().err
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0]
    if factory == "unkeyed":
        assert "CopyReplay" in lines[0]


def test_config_keeps_the_case_of_module_and_class_names():
    assert build_config({"dataset": "My_Sets:Make"}).dataset == "My_Sets:Make"
    assert build_config({"dataset": "torchvision:FashionMNIST"}).dataset == "torchvision:FashionMNIST"
    assert build_config({"dataset": " CIFAR100 "}).dataset == "cifar100"


def test_augment_is_refused_for_sets_with_their_own_transforms(tmp_path, user_module):
    from spacedkd_fast.train import run

    with pytest.raises(UserError, match="carry their own transforms"):
        run({**TINY, "augment": "cifar", "out": str(tmp_path / "a")},
            train_set=user_module.Bright(64, 0), test_set=user_module.Bright(8, 1),
            num_workers=0, progress=False)


def test_cli_torchvision_set_not_on_disk_names_the_class_and_folder(tmp_path, capsys):
    status = cli.main(["--dataset", "torchvision:FashionMNIST", "--data-dir", str(tmp_path),
                       "--out", str(tmp_path / "o"), *TINY_FLAGS])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1
    assert f"torchvision FashionMNIST: its files are not under {tmp_path}" in err[0]
    assert "--download" in err[0]


@pytest.mark.parametrize("extra", [{"mode": "spaced-self", "interval_rate": 0.5},
                                   {"mode": "offline"}], ids=["spaced-self", "offline"])
def test_run_from_python_replays_in_the_other_modes(tmp_path, user_module, extra):
    from spacedkd_fast.train import run

    out = tmp_path / "m"
    status = run({**TINY, **extra, "out": str(out)}, train_set=user_module.Bright(64, 0),
                 test_set=user_module.Bright(16, 1), num_workers=1, progress=False)
    assert status == 0
    last = rows(out)[-1]
    assert last["student_steps"] >= 8  # every batch replayed (checked against its checksum)


def test_channels_last_replays_run_through_the_loaders_workers(user_module):
    from spacedkd_fast.data.keyed_loader import KeyedLoader
    from spacedkd_fast.train.build import ChannelsLastSource

    class Counting(KeyedLoader):
        asked: list = []

        def batches(self, keys):
            keys = list(keys)
            self.asked.append(keys)
            return super().batches(keys)

    src = ChannelsLastSource(Counting(user_module.Bright(64, 0), batch_size=16, num_workers=1,
                                      seed=2))
    first = dict(src.epoch(0))
    got = list(src.batches([3, 1, 2]))
    assert Counting.asked == [[3, 1, 2]]  # one run of keys, loaded ahead by the workers
    for key, (x, y) in zip([3, 1, 2], got):
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(x, first[key][0]) and torch.equal(y, first[key][1])
