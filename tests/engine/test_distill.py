"""SpacedDistiller against naive hand-written loops (bitwise), replay fidelity, BatchNorm rules.

Models are tiny float64 MLPs with BatchNorm on CPU. Where the comparison is bitwise, the engine
is given the same plain-torch loss function the naive loop writes out inline (``ref_kd_loss`` and
``torch.dist``), so that what is compared is the engine's orchestration (order of steps, which
teacher weights, which batches, BN handling) and not two different loss implementations; the
package's fused ``KDLoss`` is compared separately with a tolerance.
"""

import copy

import pytest
import torch
from helpers.toys import (
    BETA,
    DTYPE,
    assert_same_weights,
    batches_of,
    make_pair,
    make_source,
    naive_offline,
    naive_online,
    naive_spaced,
    one_thread,  # noqa: F401 (autouse fixture)
    ref_kd_loss,
    sgd,
)

from spacedkd_fast.engine.distill import SpacedDistiller
from spacedkd_fast.engine.trace import read_trace

EPOCHS = 5


def run_engine(mode, *, interval_rate=1.5, source_keyed=True, epochs=EPOCHS, beta=BETA,
               trace=None, seed=0, loss=ref_kd_loss, feature_loss=torch.dist, **kw):
    src = make_source()
    teacher, student = make_pair(seed)
    d = SpacedDistiller(teacher, student, sgd(teacher), sgd(student), mode=mode,
                        interval_rate=interval_rate, steps_per_epoch=src.steps_per_epoch,
                        loss=loss, beta=beta, feature_loss=feature_loss, trace=trace,
                        source=src if source_keyed else None, **kw)
    for key, (x, y) in src.epochs(epochs):
        d.step(key, x, y)
    d.finish()
    return teacher, student, d


def test_online_equals_naive_loop_bitwise():
    teacher, student, d = run_engine("online")
    t_ref, s_ref = make_pair(0)
    proj = naive_online(t_ref, s_ref, batches_of(make_source(), EPOCHS))
    assert_same_weights(student, s_ref)
    assert_same_weights(teacher, t_ref)
    assert_same_weights(d.projector, proj)
    assert d.teacher_steps == d.student_steps == 35


@pytest.mark.parametrize("keyed", [True, False], ids=["keyed", "copy"])
def test_spaced_equals_official_pixel_copy_loop_bitwise(keyed):
    # compat switches on: the replay updates the teacher's BN stats and the tail is dropped
    teacher, student, d = run_engine("spaced", source_keyed=keyed, teacher_bn_update=True,
                                     flush_tail=False)
    t_ref, s_ref = make_pair(0)
    naive_spaced(t_ref, s_ref, batches_of(make_source(), EPOCHS), interval=10, official=True)
    assert_same_weights(student, s_ref)
    assert_same_weights(teacher, t_ref)  # including running stats and num_batches_tracked
    assert d.student_steps == 30


@pytest.mark.parametrize("check_finite", [True, False], ids=["checked", "unchecked"])
@pytest.mark.parametrize("keyed", [True, False], ids=["keyed", "copy"])
def test_spaced_defaults_equal_naive_loop_with_restored_bn_and_flushed_tail(keyed, check_finite):
    # unchecked: no per-step host read, so keyed records keep their checksums on the device
    teacher, student, d = run_engine("spaced", source_keyed=keyed, check_finite=check_finite)
    t_ref, s_ref = make_pair(0)
    naive_spaced(t_ref, s_ref, batches_of(make_source(), EPOCHS), interval=10, official=False)
    assert_same_weights(student, s_ref)
    assert_same_weights(teacher, t_ref)
    assert d.student_steps == 35


def test_offline_equals_naive_loop_bitwise():
    teacher, student, d = run_engine("offline")
    t_ref, s_ref = make_pair(0)
    naive_offline(t_ref, s_ref, batches_of(make_source(), EPOCHS))
    assert_same_weights(student, s_ref)
    assert_same_weights(teacher, t_ref)
    assert teacher.training  # the engine restores the teacher's mode after the eval-mode replay


def test_official_interval_rate_convention_selects_modes():
    _, s_online, d = run_engine("spaced", interval_rate=0, epochs=1)
    assert d.mode == "online"
    _, s_ref, _ = run_engine("online", epochs=1)
    assert_same_weights(s_online, s_ref)
    _, _, d = run_engine("spaced", interval_rate=50, epochs=1)
    assert d.mode == "offline"


def test_base_trains_the_student_alone_with_ce():
    src = make_source()
    _, student = make_pair(0)
    ref = copy.deepcopy(student)
    d = SpacedDistiller(None, student, None, sgd(student), mode="base",
                        steps_per_epoch=src.steps_per_epoch)
    for key, (x, y) in src.epochs(2):
        d.step(key, x, y)
    d.finish()
    opt = sgd(ref)
    for x, y in batches_of(src, 2):
        loss = torch.nn.functional.cross_entropy(ref(x)[1], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert_same_weights(student, ref)
    assert d.teacher_steps == 0 and d.student_steps == 14


def test_fused_kd_loss_matches_plain_torch_loop_closely():
    """The default loss path (package KDLoss + feature_loss('dist')) against the naive loop.

    Not bitwise: the fused op and the plain-torch composition round differently. In float64 over
    35 steps the weights agree to ~1e-12; 1e-9 leaves room without hiding a real error (a wrong
    temperature or alpha moves the weights by > 1e-3)."""
    losses = pytest.importorskip("spacedkd_fast.ops.objective")
    kd = losses.KDLoss(temperature=3.0, alpha=0.3, kd_scale=1.0)
    teacher, student, d = run_engine("spaced", loss=kd, feature_loss="dist")
    t_ref, s_ref = make_pair(0)
    naive_spaced(t_ref, s_ref, batches_of(make_source(), EPOCHS), interval=10, official=False)
    for (k, a), b in zip(student.state_dict().items(), s_ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9, msg=lambda m, k=k: f"{k}: {m}")
    stats = d.pop_stats()
    assert set(stats) >= {"teacher_loss", "student_loss", "ce", "kl", "feat"}
    assert all(v == v and v >= 0 for v in stats.values())
    assert d.pop_stats() == {}


def test_replay_fidelity_every_student_checksum_equals_its_teacher_step(tmp_path):
    for keyed in (True, False):
        path = tmp_path / f"trace_{keyed}.jsonl"
        run_engine("spaced", source_keyed=keyed, trace=path)
        events = read_trace(path)
        recorded = {e["key"]: e["checksum"] for e in events if e["event"] == "teacher_step"}
        students = [e for e in events if e["event"] == "student_step"]
        assert len(students) == 35
        for e in students:
            assert e["checksum"] == recorded[e["key"]], e


def _teacher_alone(epochs=EPOCHS):
    teacher, _ = make_pair(0)
    opt = sgd(teacher)
    for x, y in batches_of(make_source(), epochs):
        loss = torch.nn.functional.cross_entropy(teacher(x)[1], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return teacher


def test_replay_forwards_leave_teacher_bn_statistics_untouched():
    teacher, _, _ = run_engine("spaced")
    alone = _teacher_alone()
    bn, ref = teacher.body[1], alone.body[1]
    assert torch.equal(bn.running_mean, ref.running_mean)
    assert torch.equal(bn.running_var, ref.running_var)
    assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked) == 35
    assert bn.track_running_stats  # restored after each replay forward

    updated, _, _ = run_engine("spaced", teacher_bn_update=True)
    bn_u = updated.body[1]
    assert int(bn_u.num_batches_tracked) == 35 + 35  # teacher steps + replay forwards
    assert not torch.equal(bn_u.running_mean, ref.running_mean)


def test_student_epoch_callback_and_offline_epochs():
    seen = []
    run_engine("spaced", on_student_epoch_end=seen.append)
    assert seen == [1, 2, 3, 4, 5]
    seen.clear()
    src = make_source()
    teacher, student = make_pair(0)
    d = SpacedDistiller(teacher, student, sgd(teacher), sgd(student), mode="offline",
                        steps_per_epoch=src.steps_per_epoch, loss=ref_kd_loss, source=src,
                        on_student_epoch_end=seen.append)
    for key, (x, y) in src.epochs(2):
        d.step(key, x, y)
    assert seen == [] and d.student_steps == 0  # offline: nothing for the student until finish()
    d.finish()
    assert seen == [1, 2]


def test_projector_is_built_and_added_to_the_student_optimizer():
    src = make_source()
    teacher, student = make_pair(0)
    opt = sgd(student)
    d = SpacedDistiller(teacher, student, sgd(teacher), opt, steps_per_epoch=7,
                        loss=ref_kd_loss, beta=0.03, source=src)
    assert d.projector is not None
    assert d.projector(torch.zeros(2, 6, dtype=DTYPE)).shape == (2, 10)
    assert len(opt.param_groups) == 2
    no_feat = SpacedDistiller(teacher, student, sgd(teacher), sgd(student), steps_per_epoch=7,
                              loss=ref_kd_loss, beta=0.0)
    assert no_feat.projector is None


def test_models_returning_plain_logits_work():
    src = make_source()
    teacher, student = make_pair(0, features=False)
    d = SpacedDistiller(teacher, student, sgd(teacher), sgd(student), steps_per_epoch=7,
                        loss=ref_kd_loss, beta=0.03, source=src)
    for key, (x, y) in src.epochs(2):
        d.step(key, x, y)
    d.finish()
    assert d.projector is None and d.student_steps == 14


def test_offline_end_phase_is_an_iterator_the_loop_drives():
    src = make_source()
    teacher, student = make_pair(0)
    epochs_seen = []
    d = SpacedDistiller(teacher, student, sgd(teacher), sgd(student), mode="offline",
                        steps_per_epoch=7, loss=ref_kd_loss, source=src,
                        on_student_epoch_end=epochs_seen.append)
    for key, (x, y) in src.epochs(2):
        d.step(key, x, y)
    phase = d.end_phase()
    assert [next(phase) for _ in range(7)] == list(range(1, 8)) and epochs_seen == [1]
    d.finish()  # runs what is left of the same phase, nothing twice
    assert d.student_steps == 14 and epochs_seen == [1, 2]
    t_ref, s_ref = make_pair(0)
    naive_offline(t_ref, s_ref, batches_of(make_source(), 2), beta=0.0)
    assert_same_weights(student, s_ref)
