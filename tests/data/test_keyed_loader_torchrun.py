"""KeyedLoader under a real ``torchrun`` (2 processes, gloo, CPU): each rank's batches, from
the first pass with a worker and from ``batch(key)``, are rows ``rank::2`` of the single-process
global batch (rank and world size taken from the initialised process group)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

DATASET = textwrap.dedent('''
    import numpy as np
    import torch
    from torchvision.transforms import v2

    class Data(torch.utils.data.Dataset):
        def __init__(self):
            g = torch.Generator().manual_seed(4)
            self.images = torch.randint(0, 256, (14, 3, 12, 12), dtype=torch.uint8, generator=g)
            self.tf = v2.Compose([v2.RandomResizedCrop(8, antialias=True),
                                  v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True)])
        def __len__(self):
            return len(self.images)
        def __getitem__(self, i):
            return self.tf(self.images[i]) + float(np.random.rand()), i
''')

RANK_SCRIPT = DATASET + textwrap.dedent('''
    import sys
    import torch.distributed as dist
    from spacedkd_fast.data import KeyedLoader

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    loader = KeyedLoader(Data(), batch_size=4, seed=7, num_workers=1)
    first = {k: b for k, b in loader.epoch(1)}
    again = {k: loader.batch(k) for k in first}
    torch.save({"rank": loader.rank, "world": loader.world_size, "first": first,
                "again": again}, f"{sys.argv[1]}/rank{rank}.pt")
    dist.destroy_process_group()
''')


def test_each_torchrun_rank_takes_its_rows_of_every_keyed_batch(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(script), str(tmp_path)]
    try:
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail("torchrun did not finish in 180 s")
    if run.returncode != 0 and "gloo" in run.stderr.lower() and "not" in run.stderr.lower():
        pytest.skip(f"gloo cannot start here: {run.stderr.strip().splitlines()[-1]}")
    assert run.returncode == 0, run.stderr[-3000:]

    scope: dict = {}
    exec(DATASET, scope)  # noqa: S102 - the same data set definition as the ranks'
    from spacedkd_fast.data import KeyedLoader

    whole = KeyedLoader(scope["Data"](), batch_size=4, seed=7)
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert (got["rank"], got["world"]) == (r, 2)
        assert sorted(got["first"]) == list(whole.keys(1))
        for key, (x, y) in got["first"].items():
            gx, gy = whole.batch(key)
            assert torch.equal(x, gx[r::2]) and torch.equal(y, gy[r::2]), (r, key)
            ax, ay = got["again"][key]
            assert torch.equal(ax, x) and torch.equal(ay, y)
