"""The time one training checkpoint takes for a ResNet-18 teacher + student pair (CIFAR-100 heads,
SGD with momentum, so every weight has a momentum buffer: about 180 MB on disk).

Providers, on the same payload and the same folder (the pytest temporary folder: where it lives
decides the fsync cost, so the numbers are those of that disk):

- ``atomic``: ``save_checkpoint`` as a run writes it: a temporary file, flush + fsync, rename
  over the previous checkpoint, fsync of the folder (what ``--checkpoint-every`` costs each time,
  on rank 0; the other ranks wait in the next collective);
- ``torch.save`` (baseline): the same bytes written with no fsync and no rename, which is not
  crash-safe; the ratio says what the safety costs on this disk.

The size in MB is stored in the extra info and printed as the note.
"""

from __future__ import annotations

import os

import pytest
import torch

from spacedkd_fast.models import create
from spacedkd_fast.train.checkpoint import rng_state, save_checkpoint


def _trained_state(seed: int) -> tuple[dict, dict]:
    """A ResNet-18's weights and its SGD state after one step (momentum buffers exist)."""
    torch.manual_seed(seed)
    model = create("resnet18", 100, image_size=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    out = model(torch.randn(2, 3, 32, 32))
    (out[-1] if isinstance(out, tuple) else out).sum().backward()  # (features, logits)
    opt.step()
    return model.state_dict(), opt.state_dict()


@pytest.fixture(scope="module")
def payload() -> dict:
    teacher, teacher_opt = _trained_state(0)
    student, student_opt = _trained_state(1)
    return {"config": {"arch": "resnet18"}, "epoch": 3, "step_in_epoch": 120, "finished": False,
            "world_size": 1, "models": {"teacher": teacher, "student": student},
            "optimizers": {"teacher": teacher_opt, "student": student_opt},
            "schedulers": {"teacher": {}, "student": {}},
            "engine": [{"n": 1290, "replay": {"keys": list(range(1100, 1290))}}],
            "rng": [rng_state()], "metrics": [], "best": {}}


def _size_mb(path) -> float:
    return os.path.getsize(path) / 1e6


@pytest.mark.parametrize("provider", ["torch.save", "atomic"])
def test_resnet18_pair_checkpoint(bench, tmp_path, payload, provider):
    if provider == "atomic":
        def write():
            save_checkpoint(tmp_path, payload)
        written = tmp_path / "checkpoint.pt"
    else:
        written = tmp_path / "plain.pt"

        def write():
            torch.save({"format": "spacedkd_fast-checkpoint", "version": 1, **payload}, written)

    write()  # the file exists before the timed rounds: each round replaces it, as a run does
    size = _size_mb(written)
    bench(write, group="checkpoint: ResNet-18 teacher + student, SGD state", provider=provider,
          baseline=provider == "torch.save", note=f"{size:.0f} MB", size_mb=size)
