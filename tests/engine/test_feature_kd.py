"""Intermediate-feature KD (``feature_kd="inter"``) against a naive loop written from
OFFICIAL_VIT_FACTS.md section 4.5: per pair a 1x1 conv maps the student map to the teacher's
channels, both maps are resized bilinearly (align_corners=False) to the larger grid, and the MSE
over all elements is summed over pairs; the official ``*_ours`` objective is
``CE + 2.5 * sum_k MSE_k`` against a frozen teacher."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers.toys import one_thread  # noqa: F401 (autouse fixture)
from torch import nn

from spacedkd_fast.data.memory import InMemorySource
from spacedkd_fast.engine.distill import SpacedDistiller
from spacedkd_fast.engine.feature_kd import InterFeatureKD

DTYPE, CLASSES, WEIGHT = torch.float64, 5, 2.5


class ConvNet(nn.Module):
    """Two conv blocks whose outputs are the per-block maps; returns ``([f1, f2], logits)``."""

    def __init__(self, chans, first_stride):
        super().__init__()
        self.c1 = nn.Conv2d(3, chans[0], 3, stride=first_stride, padding=1)
        self.c2 = nn.Conv2d(chans[0], chans[1], 3, stride=2 if first_stride == 1 else 1,
                            padding=1)
        self.fc = nn.Linear(chans[1], CLASSES)

    def forward(self, x):
        f1 = F.relu(self.c1(x))
        f2 = F.relu(self.c2(f1))
        return [f1, f2], self.fc(f2.mean((2, 3)))


def make():
    torch.manual_seed(0)
    teacher = ConvNet((6, 10), first_stride=2).to(DTYPE)  # maps 6@4x4, 10@4x4
    student = ConvNet((4, 8), first_stride=1).to(DTYPE)  # maps 4@8x8, 8@4x4
    g = torch.Generator().manual_seed(2)
    src = InMemorySource(torch.randn(24, 3, 8, 8, generator=g, dtype=DTYPE),
                         torch.randint(0, CLASSES, (24,), generator=g), 6, seed=1, noise=0.1)
    return teacher, student, src


def ce_only(s_z, t_z, y):  # the *_ours configs have no logit term
    return F.cross_entropy(s_z, y)


def test_inter_feature_kd_equals_the_official_loop_bitwise():
    teacher, student, src = make()
    t_ref, s_ref = copy.deepcopy(teacher), copy.deepcopy(student)
    opt = torch.optim.SGD(student.parameters(), lr=0.05)
    d = SpacedDistiller(teacher, student, None, opt, mode="frozen", steps_per_epoch=4,
                        loss=ce_only, beta=WEIGHT, feature_kd="inter", source=src)
    for key, (x, y) in src.epochs(3):
        d.step(key, x, y)
    d.finish()
    assert isinstance(d.projector, InterFeatureKD) and len(d.projector.adapters) == 2

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the engine's projector_seed
        adapters = nn.ModuleList([nn.Conv2d(4, 6, 1), nn.Conv2d(8, 10, 1)]).to(DTYPE)
    ref_opt = torch.optim.SGD([*s_ref.parameters(), *adapters.parameters()], lr=0.05)
    t_ref.eval()
    for _, (x, y) in src.epochs(3):
        with torch.no_grad():
            t_maps, _ = t_ref(x)
        s_maps, z = s_ref(x)
        inter = 0
        for conv, fs, ft in zip(adapters, s_maps, t_maps):
            fs = conv(fs)
            size = (max(fs.shape[2], ft.shape[2]), max(fs.shape[3], ft.shape[3]))
            if fs.shape[2:] != size:
                fs = F.interpolate(fs, size=size, mode="bilinear", align_corners=False)
            if ft.shape[2:] != size:
                ft = F.interpolate(ft, size=size, mode="bilinear", align_corners=False)
            inter = inter + F.mse_loss(fs, ft)  # mean((f_t - f_s)^2) over all elements
        loss = F.cross_entropy(z, y) + WEIGHT * inter
        ref_opt.zero_grad()
        loss.backward()
        ref_opt.step()
    for a, b in zip([*student.parameters(), *d.projector.parameters()],
                    [*s_ref.parameters(), *adapters.parameters()]):
        assert torch.equal(a, b)


def test_inter_feature_kd_state_round_trip_and_bad_models():
    teacher, student, src = make()
    opt = torch.optim.SGD(student.parameters(), lr=0.05)
    d = SpacedDistiller(teacher, student, None, opt, mode="frozen", steps_per_epoch=4,
                        loss=ce_only, beta=WEIGHT, feature_kd="inter", source=src)
    key, (x, y) = next(iter(src.epoch(0)))
    d.step(key, x, y)
    state = d.state_dict()
    _, student2, _ = make()
    d2 = SpacedDistiller(teacher, student2, None, torch.optim.SGD(student2.parameters(), lr=0.05),
                         mode="frozen", steps_per_epoch=4, loss=ce_only, beta=WEIGHT,
                         feature_kd="inter", source=src)
    d2.load_state_dict(state)
    for a, b in zip(d.projector.parameters(), d2.projector.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="feature_kd must be one of"):
        SpacedDistiller(teacher, student, None, opt, mode="frozen", steps_per_epoch=4,
                        feature_kd="deep")

    class Flat(nn.Module):  # penultimate features, not maps
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3 * 8 * 8, CLASSES).to(DTYPE)

        def forward(self, x):
            f = x.flatten(1)
            return f, self.fc(f)

    flat = Flat()
    d3 = SpacedDistiller(teacher, flat, None, torch.optim.SGD(flat.parameters(), lr=0.1),
                         mode="frozen", steps_per_epoch=4, loss=ce_only, beta=WEIGHT,
                         feature_kd="inter", source=src)
    with pytest.raises(TypeError, match="feature_kd='inter' needs models that return"):
        d3.step(key, x, y)
