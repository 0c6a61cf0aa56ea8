"""Tiny deterministic models, data and naive reference loops shared by the engine tests and the
engine benchmark (no tests here).

The naive loops are written the way the official code is, with plain torch ops
(``cross_entropy``, ``log_softmax``, ``softmax``, ``kl_div``, ``torch.dist``) and pixel copies,
so that the engine is checked against an independent implementation.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spacedkd_fast.data.memory import InMemorySource
from spacedkd_fast.engine.errors import NonFiniteLossError

DTYPE = torch.float64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny ops run ~10x faster on one thread than with OpenMP threads spinning on a busy 2-core
    machine; restored after the module. Import this fixture into each engine test module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
IN_DIM, CLASSES = 6, 5
T, ALPHA, KD_SCALE, BETA = 3.0, 0.3, 1.0, 0.03


class TinyNet(nn.Module):
    """Linear -> BatchNorm1d -> ReLU -> (features) -> Linear; returns ``(features, logits)``."""

    def __init__(self, hidden: int = 8, classes: int = CLASSES, features: bool = True,
                 in_dim: int = IN_DIM, dtype=DTYPE) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU())
        self.fc = nn.Linear(hidden, classes)
        self.features = features
        self.feature_dim = hidden if features else None
        self.to(dtype)

    def forward(self, x):
        f = self.body(x)
        z = self.fc(f)
        return (f, z) if self.features else z


class TinyMultiExit(nn.Module):
    """Three blocks, an exit after each (deepest last); ``adapters`` for the shallow exits."""

    def __init__(self, width: int = 8, classes: int = CLASSES, dtype=DTYPE) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([
            nn.Sequential(nn.Linear(IN_DIM if i == 0 else width, width), nn.BatchNorm1d(width),
                          nn.ReLU()) for i in range(3)])
        self.heads = nn.ModuleList([nn.Linear(width, classes) for _ in range(3)])
        self.adapters = nn.ModuleList([nn.Linear(width, width) for _ in range(2)])
        self.num_exits = 3
        self.to(dtype)

    def forward(self, x):
        feats, logits, h = [], [], x
        for block, head in zip(self.blocks, self.heads):
            h = block(h)
            feats.append(h)
            logits.append(head(h))
        return feats, logits


def make_source(n: int = 50, batch: int = 8, seed: int = 0, noise: float = 0.1) -> InMemorySource:
    """50 samples in batches of 8: L = 7 with a last batch of 2."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN_DIM, generator=g, dtype=DTYPE)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return InMemorySource(x, y, batch, seed=seed, noise=noise)


def make_pair(seed: int = 0, teacher_hidden: int = 10, student_hidden: int = 6, **kw):
    torch.manual_seed(seed)
    teacher = TinyNet(teacher_hidden, **kw)
    student = TinyNet(student_hidden, **kw)
    return teacher, student


def sgd(model: nn.Module, lr: float = 0.05) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)


def ref_kd_loss(s_z, t_z, y, temperature=T, alpha=ALPHA, kd_scale=KD_SCALE):
    """(1 - alpha) CE + alpha * kd_scale * KL(q || p) with plain torch ops."""
    ce = F.cross_entropy(s_z, y)
    kl = F.kl_div(F.log_softmax(s_z / temperature, dim=1), F.softmax(t_z / temperature, dim=1),
                  reduction="batchmean")
    return (1 - alpha) * ce + alpha * kd_scale * kl


def seeded_projector(student_dim: int, teacher_dim: int, seed: int = 0) -> nn.Module:
    """The projection head built the way the engine builds it (private RNG seeded with 0)."""
    from spacedkd_fast.engine.projection import ProjectionHead

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ProjectionHead(student_dim, teacher_dim)


def _student_step(student, proj, opt, x, y, t_f, t_z, beta, kd=ref_kd_loss):
    s_f, s_z = student(x)
    loss = kd(s_z, t_z, y)
    if beta > 0:
        loss = loss + beta * torch.dist(proj(s_f), t_f)
    opt.zero_grad()
    loss.backward()
    opt.step()


def _teacher_step(teacher, opt, x, y):
    t_f, t_z = teacher(x)
    loss = F.cross_entropy(t_z, y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def _with_projector(student, teacher, beta):
    opt = sgd(student)
    proj = None
    if beta > 0:
        proj = seeded_projector(student.feature_dim, teacher.feature_dim).to(DTYPE)
        opt.add_param_group({"params": list(proj.parameters())})
    return opt, proj


def naive_online(teacher, student, batches, beta=BETA, kd=ref_kd_loss):
    """Official online KD: teacher and student on the same batch, the teacher's logits from the
    forward before its update."""
    t_opt = sgd(teacher)
    s_opt, proj = _with_projector(student, teacher, beta)
    teacher.train()
    student.train()
    for x, y in batches:
        t_f, t_z = teacher(x)
        t_loss = F.cross_entropy(t_z, y)
        s_f, s_z = student(x)
        s_loss = kd(s_z, t_z.detach(), y)
        if beta > 0:
            s_loss = s_loss + beta * torch.dist(proj(s_f), t_f.detach())
        t_opt.zero_grad()
        t_loss.backward()
        t_opt.step()
        s_opt.zero_grad()
        s_loss.backward()
        s_opt.step()
    return proj


def naive_spaced(teacher, student, batches, interval, beta=BETA, official=True, kd=ref_kd_loss):
    """Spaced KD with a host buffer of pixel copies.

    ``official=True`` is the official code: replay forwards update the teacher's BN running stats
    and the tail is dropped. ``official=False`` is the SPEC default, done the naive way: the
    teacher's buffers are saved before and restored after each soft-target forward, and the tail
    is replayed at the end.
    """
    t_opt = sgd(teacher)
    s_opt, proj = _with_projector(student, teacher, beta)
    teacher.train()
    student.train()
    buffer = []

    def replay():
        for bx, by in buffer:
            saved = None if official else copy.deepcopy(dict(teacher.named_buffers()))
            with torch.no_grad():
                t_f, t_z = teacher(bx)
            if saved is not None:
                with torch.no_grad():
                    for name, b in teacher.named_buffers():
                        b.copy_(saved[name])
            _student_step(student, proj, s_opt, bx, by, t_f, t_z, beta, kd)
        buffer.clear()

    for n, (x, y) in enumerate(batches, start=1):
        _teacher_step(teacher, t_opt, x, y)
        buffer.append((x.clone().cpu(), y.clone().cpu()))
        if n % interval == 0:
            replay()
    if not official:
        replay()
    return proj


def naive_offline(teacher, student, batches, beta=BETA):
    """Teacher trained on everything first; the student then distils from it in eval mode."""
    batches = list(batches)
    t_opt = sgd(teacher)
    s_opt, proj = _with_projector(student, teacher, beta)
    teacher.train()
    for x, y in batches:
        _teacher_step(teacher, t_opt, x, y)
    teacher.eval()
    student.train()
    for x, y in batches:
        with torch.no_grad():
            t_f, t_z = teacher(x)
        _student_step(student, proj, s_opt, x, y, t_f, t_z, beta)
    return proj


def ref_self_kd_loss(feats, logits, y, temperature=T, alpha=ALPHA, beta=BETA, kd_scale=1.0,
                     feature_exits="all"):
    """SPEC section 4 with plain torch ops: softCE = -sum q log p."""
    deep = logits[-1]
    q = F.softmax(deep.detach() / temperature, dim=1)
    loss = F.cross_entropy(deep, y)
    for z in logits[:-1]:
        soft_ce = -(q * F.log_softmax(z / temperature, dim=1)).sum(1).mean()
        loss = loss + alpha * kd_scale * soft_ce + (1 - alpha) * F.cross_entropy(z, y)
    shallow = range(len(feats) - 1) if feature_exits == "all" else range(len(feats) - 2)
    return loss, shallow


def naive_self(model, batches, interval=None, first_replay_at=None, beta=BETA,
               feature_exits="all", flush_tail=True):
    """Self KD (``interval=None``) or spaced self KD with a copy buffer."""
    opt = sgd(model)
    model.train()

    def kd_step(x, y):
        feats, logits = model(x)
        loss, shallow = ref_self_kd_loss(feats, logits, y, beta=beta, feature_exits=feature_exits)
        for i in shallow:
            loss = loss + beta * torch.dist(model.adapters[i](feats[i]), feats[-1].detach())
        opt.zero_grad()
        loss.backward()
        opt.step()

    buffer = []
    first = interval if first_replay_at is None else first_replay_at
    for n, (x, y) in enumerate(batches, start=1):
        if interval is None:
            kd_step(x, y)
            continue
        _, logits = model(x)
        loss = F.cross_entropy(logits[-1], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        buffer.append((x.clone(), y.clone()))
        if n >= first and (n - first) % interval == 0:
            for bx, by in buffer:
                kd_step(bx, by)
            buffer.clear()
    if flush_tail:
        for bx, by in buffer:
            kd_step(bx, by)


def batches_of(source: InMemorySource, epochs: int):
    return [b for _, b in source.epochs(epochs)]


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    """Bitwise equality of every parameter and buffer, naming the first difference."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if not torch.equal(sa[k], sb[k]):
            diff = (sa[k].double() - sb[k].double()).abs().max().item()
            raise AssertionError(f"{k} differs (max abs diff {diff:.3e})")


def fused_sgd(model: nn.Module) -> torch.optim.Optimizer:
    """SGD as the recipes use it, fused (the deferred finite checks need ``found_inf``)."""
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4,
                           fused=True)


def train_epochs(d, source, epochs: int, after=None) -> list[dict[str, float]]:
    """Distiller ``d`` over ``source.epoch(0 .. epochs - 1)``, then ``finish()``; ``after(n)`` is
    called after each ``step``. Returns ``pop_stats()`` of each epoch and of the end phase."""
    stats = []
    for e in range(epochs):
        for key, (x, y) in source.epoch(e):
            d.step(key, x, y)
            if after is not None:
                after(d.n)
        stats.append(d.pop_stats())
    d.finish()
    stats.append(d.pop_stats())
    return stats


def first_nonfinite(d, batches) -> NonFiniteLossError | None:
    """Distiller ``d`` over ``(key, (x, y))`` batches, then ``finish()``: the error that stopped
    it, or ``None`` when it ran to the end."""
    try:
        for key, (x, y) in batches:
            d.step(key, x, y)
        d.finish()
    except NonFiniteLossError as err:
        return err
    return None


class NaNOnCall(nn.Module):
    """Wraps a model; the ``bad``-th forward with gradients enabled (a training step, not a
    soft-target forward) returns NaN logits."""

    def __init__(self, inner: nn.Module, bad: int):
        super().__init__()
        self.inner, self.bad, self.calls = inner, bad, 0
        self.feature_dim = getattr(inner, "feature_dim", None)

    def forward(self, x):
        f, z = self.inner(x)
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls == self.bad:
                z = z * float("nan")
        return f, z


def full_and_resumed(build, batches, cut: int, reseed: int, tmp_path):
    """The same one-network run twice: straight through, and stopped after ``cut`` batches,
    checkpointed (model, optimizer, distiller), restored into a network built with another seed
    and finished. ``build(seed, trace) -> (model, opt, distiller)``. Asserts the two traces are
    identical; returns ``(full_model, resumed_model)`` for the caller's weight check."""
    ref, _, d = build(0, tmp_path / "full.jsonl")
    for key, (x, y) in batches:
        d.step(key, x, y)
    d.finish()
    m1, o1, d1 = build(0, tmp_path / "resumed.jsonl")
    for key, (x, y) in batches[:cut]:
        d1.step(key, x, y)
    ckpt = copy.deepcopy({"m": m1.state_dict(), "o": o1.state_dict(), "e": d1.state_dict()})
    d1.close()
    m2, o2, d2 = build(reseed, tmp_path / "resumed.jsonl")
    m2.load_state_dict(ckpt["m"])
    o2.load_state_dict(ckpt["o"])
    d2.load_state_dict(ckpt["e"])
    for key, (x, y) in batches[cut:]:
        d2.step(key, x, y)
    d2.finish()
    assert (tmp_path / "resumed.jsonl").read_text() == (tmp_path / "full.jsonl").read_text()
    return ref, m2


def fused_sgd_tensor_lr(model: nn.Module, lr: float = 0.05) -> torch.optim.Optimizer:
    """Fused SGD with the rate as a tensor (of the parameters' dtype and device), as captured
    steps (``cuda_graphs``) need it: a schedule writes it in place, each replay reads it."""
    p = next(model.parameters())
    return torch.optim.SGD(model.parameters(), lr=torch.tensor(lr, dtype=p.dtype, device=p.device),
                           momentum=0.9, weight_decay=5e-4, fused=True)


class InPlaceDecay:
    """A per-step LR schedule written in place into tensor rates: ``lr0 * gamma ** (t // every)``
    after ``t`` steps (the engine calls ``step()`` after each optimizer step)."""

    def __init__(self, opt: torch.optim.Optimizer, gamma: float = 0.7, every: int = 3) -> None:
        self.opt, self.gamma, self.every, self.t = opt, gamma, every, 0
        self.lr0 = float(opt.param_groups[0]["lr"])

    def step(self) -> None:
        self.t += 1
        for g in self.opt.param_groups:
            g["lr"].fill_(self.lr0 * self.gamma ** (self.t // self.every))


class ScaledLogits(nn.Module):
    """Wraps a ``(features, logits)`` model; its logits are multiplied by ``scale``, a 0-dim tensor
    (1.0) kept outside the module's buffers. ``scale.fill_(nan)`` poisons every later forward
    from the device side, which a captured step sees on replay (:class:`NaNOnCall` counts Python
    calls, of which a replay makes none)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.feature_dim = getattr(inner, "feature_dim", None)
        p = next(inner.parameters())
        self.scale = torch.ones((), dtype=p.dtype, device=p.device)

    def forward(self, x):
        f, z = self.inner(x)
        return f, z * self.scale
