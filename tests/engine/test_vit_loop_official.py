"""The official ViT loop (``replay="fresh"``) against OFFICIAL_VIT_FACTS.md section 4.4.

The reference below is written from the facts, not from the engine: one AdamW over teacher and
student, a teacher CE step on every batch of the first loader with ``0 * sum(student params)``
added (exact zero gradients: AdamW still decays and moves the student), ``space_counter += 1``; when
``space_counter >= L * s`` the student takes ``S = space_counter`` steps over up to
``S // L + 1`` passes of a second, independently shuffled loader (each pass a fresh shuffle), the
``break`` leaving only the inner loop; the current teacher (train mode, no_grad) gives the soft
targets. The toy models have no BatchNorm and no dropout, so the official loop's logging-only
student forward in the teacher step changes nothing."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers.toys import one_thread  # noqa: F401 (autouse fixture)
from torch import nn

from spacedkd_fast.data.memory import InMemorySource
from spacedkd_fast.engine.distill import SpacedDistiller
from spacedkd_fast.engine.source_protocol import StreamedSource
from spacedkd_fast.engine.spacing import SpacedSchedule, catch_up_passes
from spacedkd_fast.engine.trace import read_trace
from spacedkd_fast.ops.objective import KDObjective

L, EPOCHS, CLASSES = 10, 4, 5
RATES = [0.5, 1.0, 1.5, 2.0, 4.0]
T, ALPHA = 1.0, 0.5


@pytest.mark.parametrize("length,rate,teacher,student", [
    (390, 0.5, 195, 195), (390, 1.0, 390, 391), (390, 1.5, 585, 585), (390, 2.0, 780, 781),
    (781, 0.5, 391, 391), (781, 1.0, 781, 782), (781, 1.5, 1172, 1172), (781, 2.0, 1562, 1563)])
def test_steps_per_cycle_reproduce_the_facts_table(length, rate, teacher, student):
    sched = SpacedSchedule.build(length, rate, "vit")
    assert sched.interval == teacher
    assert sum(catch_up_passes(sched.interval, length)) == student


def make_source(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 6, generator=g, dtype=dtype)
    y = torch.randint(0, CLASSES, (40,), generator=g)
    return InMemorySource(x, y, 4, seed=3, noise=0.1)  # L = 10


def mlp(seed, width, dtype):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Linear(width, CLASSES)).to(dtype)


def adamw(teacher, student):
    return torch.optim.AdamW(list(teacher.parameters()) + list(student.parameters()), lr=1e-2,
                             weight_decay=0.05)


def vit_kd(s_z, t_z, y):
    """(1 - a) CE + a * T^2 * KL_sum / (B * C) (facts section 4.3)."""
    kl_sum = F.kl_div(F.log_softmax(s_z / T, dim=1), F.softmax(t_z / T, dim=1), reduction="sum")
    return (1 - ALPHA) * F.cross_entropy(s_z, y) + ALPHA * T * T * kl_sum / s_z.numel()


def official_vit_loop(teacher, student, src, s, second_forward=False):
    opt = adamw(teacher, student)
    space, space_pass, counter, per_epoch = src.stream(1), 0, 0, []
    teacher.train()
    student.train()
    for epoch in range(EPOCHS):
        t_steps = s_steps = 0
        for _, (x, y) in src.epoch(epoch):
            loss = F.cross_entropy(teacher(x), y) + 0 * sum(p.sum() for p in student.parameters())
            opt.zero_grad()
            loss.backward()
            opt.step()
            counter += 1
            t_steps += 1
            if counter >= L * s:
                big_s, done = counter, 0
                for _ in range(big_s // L + 1):
                    for _, (xs, ys) in space.epoch(space_pass):
                        with torch.no_grad():
                            z_t = teacher(xs)
                        z_s = student(xs)
                        z_kd = student(xs) if second_forward else z_s
                        loss = ((1 - ALPHA) * F.cross_entropy(z_s, ys)
                                + (vit_kd(z_kd, z_t, ys) - (1 - ALPHA) * F.cross_entropy(z_kd, ys))
                                + 0 * sum(p.sum() for p in teacher.parameters()))
                        opt.zero_grad()
                        loss.backward()
                        opt.step()
                        done += 1
                        s_steps += 1
                        if done >= big_s:
                            break
                    space_pass += 1
                counter = 0
        per_epoch.append((t_steps, s_steps))
    return per_epoch


def run_engine(s, dtype, trace=None, **kw):
    src = make_source(dtype)
    teacher, student = mlp(0, 12, dtype), mlp(1, 7, dtype)
    opt = adamw(teacher, student)
    d = SpacedDistiller(teacher, student, opt, opt, mode="spaced", interval_rate=s,
                        steps_per_epoch=L, source=src, trace=trace, **kw)
    for key, (x, y) in src.epochs(EPOCHS):
        d.step(key, x, y)
    d.finish()
    return teacher, student, d


def per_epoch_counts(path):
    counts, epoch = [[0, 0] for _ in range(EPOCHS)], 0
    for e in read_trace(path):
        if e["event"] == "teacher_step":
            epoch = e["epoch"]
            counts[epoch][0] += 1
        elif e["event"] == "student_step":
            counts[epoch][1] += 1
    return [tuple(c) for c in counts]


@pytest.mark.parametrize("s", RATES)
def test_switches_reproduce_the_official_loop_bitwise_in_float32(s, tmp_path):
    teacher, student, d = run_engine(
        s, torch.float32, trace=tmp_path / "t.jsonl", loss=vit_kd, replay="fresh",
        shared_optimizer=True, teacher_bn_update=True, flush_tail=False)
    src = make_source(torch.float32)
    t_ref, s_ref = mlp(0, 12, torch.float32), mlp(1, 7, torch.float32)
    per_epoch = official_vit_loop(t_ref, s_ref, src, s)
    for a, b in zip([*teacher.parameters(), *student.parameters()],
                    [*t_ref.parameters(), *s_ref.parameters()]):
        assert torch.equal(a, b)
    assert per_epoch_counts(tmp_path / "t.jsonl") == per_epoch


def test_per_epoch_counts_of_the_facts_cpu_check(tmp_path):
    # facts 4.4, "CPU check with L = 10 and 4 epochs"
    want = {0.5: [(10, 10)] * 4, 1.0: [(10, 11)] * 4,
            1.5: [(10, 0), (10, 15), (10, 15), (10, 0)],
            2.0: [(10, 0), (10, 21), (10, 0), (10, 21)]}
    for s, counts in want.items():
        path = tmp_path / f"{s}.jsonl"
        run_engine(s, torch.float32, trace=path, compat="official-vit")
        assert per_epoch_counts(path) == counts, s


@pytest.mark.parametrize("s", [0.5, 1.5])
def test_official_vit_preset_matches_the_official_loop(s, tmp_path):
    teacher, student, d = run_engine(s, torch.float64, trace=tmp_path / "t.jsonl",
                                     compat="official-vit", temperature=T, alpha=ALPHA)
    assert d.kd == KDObjective(T, ALPHA, normalization="class")
    assert d.kd_second_forward and d.shared_optimizer and d.replay == "fresh"
    src = make_source(torch.float64)
    t_ref, s_ref = mlp(0, 12, torch.float64), mlp(1, 7, torch.float64)
    official_vit_loop(t_ref, s_ref, src, s, second_forward=True)
    for a, b in zip([*teacher.parameters(), *student.parameters()],
                    [*t_ref.parameters(), *s_ref.parameters()]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    events = read_trace(tmp_path / "t.jsonl")
    assert {e["rule"] for e in events if e["event"] == "replay_start"} == {
        "space_counter >= L * s"}
    assert {e.get("stream") for e in events if e["event"] == "student_step"} == {1}


def test_fresh_replay_resumes_exactly(tmp_path):
    full = tmp_path / "full.jsonl"
    t_full, s_full, _ = run_engine(1.5, torch.float64, trace=full, compat="official-vit")
    src = make_source(torch.float64)
    teacher, student = mlp(0, 12, torch.float64), mlp(1, 7, torch.float64)
    opt = adamw(teacher, student)
    part = tmp_path / "part.jsonl"

    def build(t, st, o):
        return SpacedDistiller(t, st, o, o, mode="spaced", interval_rate=1.5, steps_per_epoch=L,
                               source=src, trace=part, compat="official-vit")

    d = build(teacher, student, opt)
    batches = list(src.epochs(EPOCHS))
    for key, (x, y) in batches[:23]:  # after the first catch-up (15) and into the next
        d.step(key, x, y)
    ckpt = copy.deepcopy({"t": teacher.state_dict(), "s": student.state_dict(),
                          "o": opt.state_dict(), "e": d.state_dict()})
    d.close()
    t2, s2 = mlp(5, 12, torch.float64), mlp(6, 7, torch.float64)
    o2 = adamw(t2, s2)
    t2.load_state_dict(ckpt["t"])
    s2.load_state_dict(ckpt["s"])
    o2.load_state_dict(ckpt["o"])
    d2 = build(t2, s2, o2)
    d2.load_state_dict(ckpt["e"])
    for key, (x, y) in batches[23:]:
        d2.step(key, x, y)
    d2.finish()
    assert part.read_text() == full.read_text()
    for a, b in zip([*t2.parameters(), *s2.parameters()],
                    [*t_full.parameters(), *s_full.parameters()]):
        assert torch.equal(a, b)


def test_bad_combinations():
    src = make_source(torch.float32)
    assert isinstance(src, StreamedSource)
    teacher, student = mlp(0, 12, torch.float32), mlp(1, 7, torch.float32)
    opt = adamw(teacher, student)
    with pytest.raises(ValueError, match="one optimizer over both networks"):
        SpacedDistiller(teacher, student, torch.optim.SGD(teacher.parameters(), lr=0.1), opt,
                        steps_per_epoch=L, source=src, compat="official-vit")
    with pytest.raises(ValueError, match="second stream"):
        SpacedDistiller(teacher, student, opt, opt, steps_per_epoch=L, compat="official-vit")
    with pytest.raises(ValueError, match="contradicts"):
        SpacedDistiller(teacher, student, opt, opt, steps_per_epoch=L, source=src,
                        compat="official-vit", loss=KDObjective())


def official_vit_online(teacher, student, src):
    """Official online mode: (1 - a) (CE_s + CE_t) + a KD(z_s_kd, stopgrad z_t), one AdamW step;
    the student's KD logits come from a second forward."""
    opt = adamw(teacher, student)
    for epoch in range(EPOCHS):
        for _, (x, y) in src.epoch(epoch):
            z_t = teacher(x)
            z_s = student(x)
            z_kd = student(x)
            kd = vit_kd(z_kd, z_t.detach(), y) - (1 - ALPHA) * F.cross_entropy(z_kd, y)
            loss = (1 - ALPHA) * (F.cross_entropy(z_s, y) + F.cross_entropy(z_t, y)) + kd
            opt.zero_grad()
            loss.backward()
            opt.step()


def test_official_vit_online_objective_is_one_step_over_both_networks():
    teacher, student, d = run_engine(0.0, torch.float64, compat="official-vit", temperature=T,
                                     alpha=ALPHA)
    assert d.mode == "online" and d.student_steps == d.teacher_steps == EPOCHS * L
    t_ref, s_ref = mlp(0, 12, torch.float64), mlp(1, 7, torch.float64)
    official_vit_online(t_ref, s_ref, make_source(torch.float64))
    for a, b in zip([*teacher.parameters(), *student.parameters()],
                    [*t_ref.parameters(), *s_ref.parameters()]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("compat,teacher_mode", [(None, "eval"), ("official-vit", "train")])
def test_frozen_teacher_mode(compat, teacher_mode):
    """A pretrained teacher that never trains; the official one runs in train mode (its drop path
    and BatchNorm batch statistics on), ours in eval mode."""
    src = make_source(torch.float64)
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU(),
                            nn.Linear(12, CLASSES)).double()
    student = mlp(1, 7, torch.float64)
    ref_t, ref_s = copy.deepcopy(teacher), copy.deepcopy(student)
    opt = torch.optim.SGD(student.parameters(), lr=0.05)
    d = SpacedDistiller(teacher, student, None, opt, mode="frozen", steps_per_epoch=L,
                        compat=compat, temperature=T, alpha=ALPHA)
    for key, (x, y) in src.epochs(2):
        d.step(key, x, y)
    d.finish()
    assert d.teacher_steps == 0 and d.student_steps == 2 * L
    ref_opt = torch.optim.SGD(ref_s.parameters(), lr=0.05)
    ref_t.train(teacher_mode == "train")
    for _, (x, y) in src.epochs(2):
        with torch.no_grad():
            z_t = ref_t(x)
        z_s = ref_s(x)
        if compat:  # second forward for the KD logits (the same values: no dropout here)
            loss = (1 - ALPHA) * F.cross_entropy(z_s, y) + (
                vit_kd(ref_s(x), z_t, y) - (1 - ALPHA) * F.cross_entropy(ref_s(x), y))
        else:  # ours: KDObjective(T, alpha) with kd_scale T*T, batch-mean KL
            kl = F.kl_div(F.log_softmax(z_s / T, 1), F.softmax(z_t / T, 1), reduction="batchmean")
            loss = (1 - ALPHA) * F.cross_entropy(z_s, y) + ALPHA * T * T * kl
        ref_opt.zero_grad()
        loss.backward()
        ref_opt.step()
    for a, b in zip(student.parameters(), ref_s.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    # the teacher's weights never move; its BN statistics move only in official train mode
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), ref_t.parameters()))
    moved = not torch.equal(teacher[1].running_mean, torch.zeros(12, dtype=torch.float64))
    assert moved == (teacher_mode == "train")
    assert teacher.training  # the user's mode is restored
