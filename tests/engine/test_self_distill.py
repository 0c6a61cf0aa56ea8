"""SelfDistiller with a tiny 3-exit model: the SPEC section 4 loss, replay timing from the trace,
the compat switches, replay fidelity.

The engine's loss uses the package's fused ``kd_loss`` (KL plus the constant entropy term put back)
while the references here write softCE out with plain torch ops, so weights are compared with a
tolerance. The tiny BN network at lr 0.05 is chaotic: a 1e-16 rounding difference grows about
100x per epoch (measured: 2e-15, 3e-12, 7e-11, 3e-8 after 1, 2, 3, 5 epochs), so weights are
compared after 3 epochs (21 steps, two replays and a tail) at atol 1e-9, far below what a wrong
temperature, alpha, exit or schedule would move (> 1e-4)."""

import pytest
import torch
from helpers.toys import (  # noqa: F401 (one_thread is an autouse fixture)
    BETA,
    TinyMultiExit,
    make_source,
    naive_self,
    one_thread,
    ref_self_kd_loss,
    sgd,
)

from spacedkd_fast.engine.distill import SelfDistiller
from spacedkd_fast.engine.trace import read_trace
from spacedkd_fast.ops.objective import KDObjective

# the references write the official objective (kd_scale 1); the engine's default is T*T
OFFICIAL = KDObjective(temperature=3.0, alpha=0.3, kd_scale=1.0)

EPOCHS = 5  # schedules
CMP_EPOCHS = 3  # weight comparisons (see the module docstring)


def close_weights(a, b, atol=1e-9):
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=0, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def run(mode="spaced-self", rate=1.5, trace=None, keyed=True, epochs=EPOCHS, **kw):
    src = make_source()
    torch.manual_seed(0)
    model = TinyMultiExit()
    kw.setdefault("loss", OFFICIAL)
    d = SelfDistiller(model, sgd(model), mode=mode, interval_rate=rate, steps_per_epoch=7,
                      trace=trace, source=src if keyed else None, **kw)
    for key, (x, y) in src.epochs(epochs):
        d.step(key, x, y)
    d.finish()
    return model, d


def reference(epochs=CMP_EPOCHS, **kw):
    torch.manual_seed(0)
    model = TinyMultiExit()
    naive_self(model, [b for _, b in make_source().epochs(epochs)], **kw)
    return model


def test_self_kd_loss_value_and_gradient_match_the_spec_formula():
    torch.manual_seed(0)
    model = TinyMultiExit()
    d = SelfDistiller(model, sgd(model), mode="self", steps_per_epoch=7, loss=OFFICIAL)
    x, y = make_source().batch(1)
    feats, logits = model(x)
    loss, parts = d.self_kd_loss(feats, logits, y)
    ref, shallow = ref_self_kd_loss(feats, logits, y)
    for i in shallow:
        ref = ref + BETA * torch.dist(model.adapters[i](feats[i]), feats[-1].detach())
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    g = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
    g_ref = torch.autograd.grad(ref, list(model.parameters()))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert set(parts) == {"ce", "kl", "feat"}


def test_self_mode_matches_naive_loop():
    model, d = run(mode="self", epochs=CMP_EPOCHS)
    close_weights(model, reference(interval=None))
    assert d.student_steps == 21 and d.teacher_steps == 0


@pytest.mark.parametrize("keyed", [True, False], ids=["keyed", "copy"])
def test_spaced_self_matches_naive_loop(keyed):
    model, d = run(keyed=keyed, epochs=CMP_EPOCHS)
    close_weights(model, reference(interval=10))
    assert d.teacher_steps == 21 and d.student_steps == 21


def test_official_switches_match_naive_loop_with_the_same_switches():
    model, d = run(self_kd_first_replay="one-epoch", self_kd_feature_exits="official",
                   flush_tail=False, epochs=CMP_EPOCHS)
    assert d.student_steps == 17  # replays at 7 and 17; the tail 18..21 is dropped
    close_weights(model, reference(interval=10, first_replay_at=7, feature_exits="official",
                                   flush_tail=False))
    # and they change the result: the defaults give other weights
    default, _ = run(epochs=CMP_EPOCHS)
    assert not torch.allclose(model.heads[0].weight, default.heads[0].weight, atol=1e-6)


def test_official_feature_exits_skip_the_exit_before_the_deepest():
    torch.manual_seed(0)
    init = TinyMultiExit().adapters.state_dict()
    model, _ = run(self_kd_feature_exits="official")
    assert torch.equal(model.adapters[1].weight, init["1.weight"])  # no feature loss on exit 2
    assert not torch.equal(model.adapters[0].weight, init["0.weight"])
    model_all, _ = run()
    assert not torch.equal(model_all.adapters[1].weight, init["1.weight"])


def _compress(path):
    out = []
    for e in read_trace(path):
        if e["event"] == "teacher_step":
            out.append(("T", e["key"]))
        elif e["event"] == "student_step":
            out.append(("S", e["key"], e["teacher_step"]))
        elif e["event"] == "flush":
            out.append(("F", e["replayed"], e["dropped"]))
    return out


@pytest.mark.parametrize("first,boundaries", [("interval", [10, 20, 30]),
                                              ("one-epoch", [7, 17, 27])])
@pytest.mark.parametrize("flush_tail", [True, False])
def test_spaced_self_replay_timing(tmp_path, first, boundaries, flush_tail):
    path = tmp_path / "t.jsonl"
    run(trace=path, self_kd_first_replay=first, flush_tail=flush_tail)
    want, last = [], 0
    for n in range(1, 36):
        want.append(("T", n))
        if n in boundaries:
            want += [("S", k, n) for k in range(last + 1, n + 1)]
            last = n
    tail = list(range(last + 1, 36))
    want.append(("F", len(tail) if flush_tail else 0, 0 if flush_tail else len(tail)))
    if flush_tail:
        want += [("S", k, 35) for k in tail]
    assert _compress(path) == want


def test_self_mode_schedule_and_fidelity(tmp_path):
    path = tmp_path / "t.jsonl"
    run(mode="spaced-self", rate=0, trace=path)  # official convention: rate 0 = plain self KD
    assert _compress(path) == [("S", n, n) for n in range(1, 36)]
    path2 = tmp_path / "t2.jsonl"
    run(trace=path2)
    events = read_trace(path2)
    recorded = {e["key"]: e["checksum"] for e in events if e["event"] == "teacher_step"}
    for e in events:
        if e["event"] == "student_step":
            assert e["checksum"] == recorded[e["key"]]


def test_bad_self_kd_input():
    model = TinyMultiExit()
    with pytest.raises(ValueError, match="self_kd_feature_exits"):
        SelfDistiller(model, sgd(model), steps_per_epoch=7, self_kd_feature_exits="some")
    with pytest.raises(ValueError, match="first_replay"):
        SelfDistiller(model, sgd(model), steps_per_epoch=7, self_kd_first_replay="never")
    with pytest.raises(ValueError, match="first_replay"):
        SelfDistiller(model, sgd(model), steps_per_epoch=7, self_kd_first_replay="vit")
    single = torch.nn.Linear(6, 5).double()
    d = SelfDistiller(single, sgd(single), mode="self", steps_per_epoch=7)
    x, y = make_source().batch(1)
    with pytest.raises(TypeError, match="multi-exit"):
        d.step(1, x, y)


def test_bfloat16_autocast_self_kd_runs():
    src = make_source()
    src.x = src.x.float()
    torch.manual_seed(0)
    model = TinyMultiExit(dtype=torch.float32)
    d = SelfDistiller(model, sgd(model), interval_rate=1.5, steps_per_epoch=7, source=src,
                      amp_dtype=torch.bfloat16)
    for key, (x, y) in src.epochs(2):
        d.step(key, x, y)
    d.finish()
    assert d.student_steps == 14
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in model.parameters())


def test_objective_default_keywords_and_bad_combinations():
    model = TinyMultiExit()
    d = SelfDistiller(model, sgd(model), steps_per_epoch=7)
    assert d.objective == KDObjective()  # the package's one default (kd_scale = T*T)
    d = SelfDistiller(model, sgd(model), steps_per_epoch=7, temperature=4.0, kd_scale=1.0)
    assert d.objective == KDObjective(temperature=4.0, kd_scale=1.0)  # user values kept
    with pytest.raises(ValueError, match="either loss=KDObjective"):
        SelfDistiller(model, sgd(model), steps_per_epoch=7, loss=OFFICIAL, alpha=0.5)
    with pytest.raises(TypeError, match="KDObjective"):
        SelfDistiller(model, sgd(model), steps_per_epoch=7, loss=KDObjective(kind="paper-code"))
    with pytest.raises(TypeError, match="KDObjective"):
        SelfDistiller(model, sgd(model), steps_per_epoch=7, loss=lambda s, t, y: s.sum())


def test_keywords_train_the_same_as_the_objective():
    by_objective, _ = run(mode="self", epochs=1, loss=KDObjective(2.0, 0.5, 1.0))
    by_keywords, _ = run(mode="self", epochs=1, loss=None, temperature=2.0, alpha=0.5,
                         kd_scale=1.0)
    for a, b in zip(by_objective.parameters(), by_keywords.parameters()):
        assert torch.equal(a, b)
