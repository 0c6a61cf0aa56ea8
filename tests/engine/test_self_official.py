"""``SelfDistiller(compat="official")`` against a naive re-creation of the official self-KD loop.

The reference is written from SPEC rule 4 with plain torch ops, not from the engine (nor from the
shared test helpers' losses): every batch first goes through one train-mode forward; the official
counter ``n_iter = (epoch - 1) * L + i + 1`` (epochs from 0) fires a replay when
``n_iter % I == 0`` with Python's modulo; the batch that fires it is buffered and replayed but gets
no CE-only step (its first forward's outputs are thrown away, its BatchNorm statistics stay); the
feature loss skips the exit before the deepest; leftovers are dropped; the KD term has no T^2.
Everything in ``state_dict`` is compared, BatchNorm running statistics and
``num_batches_tracked`` included. The engine's loss uses the fused kernel and the reference plain
torch ops, so weights and buffers are compared in float64, at 1e-9 after 3 epochs (see
test_self_distill.py for why that bound is tight; tighter than the 5e-7 asked for). float32 is not
a fair test on this toy: its rounding differences grow chaotically (9e-8 after one epoch at
s = 1.5, 4e-3 after three at s = 0.5)."""


import pytest
import torch
import torch.nn.functional as F
from helpers.toys import (  # noqa: F401 (one_thread is an autouse fixture)
    BETA,
    TinyMultiExit,
    full_and_resumed,
    make_source,
    one_thread,
    sgd,
)

from spacedkd_fast.engine.distill import SelfDistiller
from spacedkd_fast.engine.trace import read_trace
from spacedkd_fast.ops.objective import KDObjective

L, EPOCHS = 7, 3
RATES = [0.5, 1.0, 1.5, 2.0, 4.0]
# every switch of the preset but the trigger batch's discarded forward
WITHOUT_TRIGGER_FORWARD = dict(self_kd_first_replay="official", self_kd_feature_exits="official",
                               self_kd_trigger_step="kd-only", self_kd_trigger_forward=False,
                               flush_tail=False, loss=KDObjective(kd_scale=1.0))


def official_self_kd_loop(model, epochs_of_batches, s, temperature=3.0, alpha=0.3, beta=BETA):
    """The official self-KD loop; returns the steps ``n`` (from 1) whose batch fired a replay."""
    opt = sgd(model)
    model.train()
    interval = int(L * s)

    def kd_step(x, y):
        feats, logits = model(x)
        deep = logits[-1]
        q = F.softmax(deep.detach() / temperature, dim=1)
        loss = F.cross_entropy(deep, y)
        for z in logits[:-1]:
            soft_ce = -(q * F.log_softmax(z / temperature, dim=1)).sum(1).mean()
            loss = loss + alpha * soft_ce + (1 - alpha) * F.cross_entropy(z, y)
        for i in range(len(feats) - 2):  # not the exit just before the deepest
            loss = loss + beta * torch.dist(model.adapters[i](feats[i]), feats[-1].detach())
        opt.zero_grad()
        loss.backward()
        opt.step()

    buffer, replays = [], []
    for epoch, batches in enumerate(epochs_of_batches):
        for i, (x, y) in enumerate(batches):
            n_iter = (epoch - 1) * L + i + 1
            _, logits = model(x)  # the forward at the top of the loop, every batch
            buffer.append((x.clone(), y.clone()))
            if n_iter % interval == 0:  # that forward's outputs are thrown away
                replays.append(epoch * L + i + 1)
                for bx, by in buffer:
                    kd_step(bx, by)
                buffer.clear()
            else:
                loss = F.cross_entropy(logits[-1], y)
                opt.zero_grad()
                loss.backward()
                opt.step()
    return replays  # leftovers in `buffer` are dropped


def reference(s):
    """The reference network after the official loop, and its replay steps."""
    torch.manual_seed(0)
    ref = TinyMultiExit()
    src = make_source()
    epochs = [[b for _, b in src.epoch(e)] for e in range(EPOCHS)]
    return ref, official_self_kd_loop(ref, epochs, s)


def assert_same_state(model, ref, atol):
    """Weights and every buffer (running statistics, ``num_batches_tracked``) alike."""
    a, b = model.state_dict(), ref.state_dict()
    assert list(a) == list(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def bn_counts(model):
    return {k: int(v) for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")}


def run_engine(s, trace=None, keyed=True, **kw):
    src = make_source()
    torch.manual_seed(0)
    model = TinyMultiExit()
    d = SelfDistiller(model, sgd(model), interval_rate=s, steps_per_epoch=L,
                      source=src if keyed else None, trace=trace, **kw)
    for key, (x, y) in src.epochs(EPOCHS):
        d.step(key, x, y)
    d.finish()
    return model, d


@pytest.mark.parametrize("keyed", [True, False], ids=["keyed", "copy"])
@pytest.mark.parametrize("s", RATES)
def test_official_preset_matches_the_official_loop(s, keyed, tmp_path):
    model, d = run_engine(s, trace=tmp_path / "t.jsonl", keyed=keyed, compat="official")
    ref, replays = reference(s)
    assert_same_state(model, ref, atol=1e-9)
    # one BN forward per batch at the top of the loop, one more per replayed batch: the batches
    # up to the last trigger (the tail is dropped)
    assert set(bn_counts(model).values()) == {EPOCHS * L + replays[-1]}
    events = read_trace(tmp_path / "t.jsonl")
    starts = [e for e in events if e["event"] == "replay_start"]
    # k trigger batches (this one included) got no CE step before the k-th replay
    assert [e["teacher_step"] for e in starts] == [n - k for k, n in enumerate(replays, 1)]
    assert all(e["rule"] == "(n - L) % I == 0" for e in starts)
    assert [e["n"] for e in events if e["event"] == "record"] == replays
    assert d.teacher_steps == EPOCHS * L - len(replays)


def test_the_trigger_forward_moves_only_batchnorm_statistics():
    # without it: the same weights, but each trigger batch's forward is missing from BN's
    # statistics (num_batches_tracked one short per replay)
    model, d = run_engine(1.5, **WITHOUT_TRIGGER_FORWARD)
    ref, replays = reference(1.5)
    a, b = model.state_dict(), ref.state_dict()
    for k in a:
        if "running" in k:
            assert (a[k] - b[k]).abs().max() > 1e-6, k
        elif not k.endswith("num_batches_tracked"):
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-9, msg=lambda m, k=k: f"{k}: {m}")
    assert {k: v + len(replays) for k, v in bn_counts(model).items()} == bn_counts(ref)
    assert not d.trigger_forward


def test_first_replays_inside_the_first_epoch_follow_python_modulo():
    # L = 7, s = 0.5: I = 3 and n - L = -6, -3, 0, ... fire: n = 1, 4, 7, 10, ...
    _, d = run_engine(0.5, compat="official")
    assert d.schedule.first_replay_at == 1
    assert [n for n in range(1, 15) if d.schedule.replay_due(n)] == [1, 4, 7, 10, 13]


def test_preset_objective_and_contradictions():
    model = TinyMultiExit()
    d = SelfDistiller(model, sgd(model), steps_per_epoch=L, compat="official", temperature=4.0,
                      alpha=0.5)
    assert d.objective == KDObjective(temperature=4.0, alpha=0.5, kd_scale=1.0)
    assert (d.flush_tail, d.feature_exits, d.trigger_step, d.trigger_forward) == (
        False, "official", "kd-only", True)
    with pytest.raises(ValueError, match="compat='official' sets flush_tail=False"):
        SelfDistiller(model, sgd(model), steps_per_epoch=L, compat="official", flush_tail=True)
    with pytest.raises(ValueError, match="contradicts"):
        SelfDistiller(model, sgd(model), steps_per_epoch=L, compat="official",
                      loss=KDObjective())  # kd_scale T*T is not the official objective
    with pytest.raises(ValueError, match="kd_scale=1.0"):
        SelfDistiller(model, sgd(model), steps_per_epoch=L, compat="official", kd_scale=9.0)
    with pytest.raises(ValueError, match="compat='official' sets self_kd_trigger_forward=True"):
        SelfDistiller(model, sgd(model), steps_per_epoch=L, compat="official",
                      self_kd_trigger_forward=False)
    with pytest.raises(ValueError, match="needs self_kd_trigger_step='kd-only'"):
        SelfDistiller(model, sgd(model), steps_per_epoch=L, self_kd_trigger_forward=True)
    with pytest.raises(ValueError, match="compat must be one of"):
        SelfDistiller(model, sgd(model), steps_per_epoch=L, compat="official-vit")
    with pytest.raises(ValueError, match=r"smallest valid interval_rate is 1/7 \(use >= 0.142858"):
        SelfDistiller(model, sgd(model), steps_per_epoch=L, interval_rate=0.1, compat="official")


def test_the_reference_tells_the_trigger_rules_apart():
    # the same switches but ours for the trigger batch: a CE step first, then its KD step
    model, _ = run_engine(1.5, self_kd_first_replay="official", self_kd_feature_exits="official",
                          flush_tail=False, loss=KDObjective(kd_scale=1.0))
    ref, _ = reference(1.5)
    assert (model.heads[0].weight - ref.heads[0].weight).abs().max() > 1e-4


def test_each_official_switch_alone_changes_only_its_part():
    # the trigger-step switch alone: same replay points as ours, one fewer CE step per replay
    _, d = run_engine(1.5, self_kd_trigger_step="kd-only", loss=KDObjective(kd_scale=1.0))
    assert d.teacher_steps == EPOCHS * L - 2 and d.student_steps == EPOCHS * L  # replays 10, 20


def test_official_preset_resumes_exactly(tmp_path):
    batches = list(make_source().epochs(EPOCHS))

    def build(seed, trace):
        torch.manual_seed(seed)
        model = TinyMultiExit()
        opt = sgd(model)
        return model, opt, SelfDistiller(model, opt, interval_rate=0.5, steps_per_epoch=L,
                                         source=make_source(), trace=trace, compat="official")

    # replays at 1, 4, 7 before the cut; 8 and 9 pending
    ref, m2 = full_and_resumed(build, batches, 9, 5, tmp_path)
    for a, b in zip(m2.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)
