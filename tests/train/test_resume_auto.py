"""``--resume auto`` and ``--checkpoint-every`` in one process (in-process runs on the tiny digits
subset: L = 5 steps per epoch).

- A run that crashes after a mid-epoch checkpoint and is re-run with the same command continues
  from that step and ends bitwise equal to an uninterrupted run (weights, optimiser, engine state,
  metrics but timing, trace).
- The re-run of a finished command does nothing; a differing configuration is refused with one
  line naming the setting; a checkpoint of another package version is accepted and said; one
  whose configuration this version cannot read is refused naming the setting.
"""

from __future__ import annotations

import io
import shutil

import pytest
import torch
from run_helpers import L, tiny_config

from spacedkd_fast.train import checkpoint as ckpt
from spacedkd_fast.train import faults, runner
from spacedkd_fast.train.report import TIMING_KEYS
from spacedkd_fast.train.resume_policy import CheckpointEvery, parse_checkpoint_every

EPOCHS = 2
EVERY = 2  # mid-epoch checkpoints after global steps 2, 4, 6, 8 (5 and 10 end the epochs)


class Crash(Exception):
    """Stands for the process dying (the checkpoint on disk is all that is left)."""


def auto(cfg, data) -> tuple[int, str]:
    stream = io.StringIO()
    status = runner.train(cfg, progress=False, data=data, stream=stream, resume="auto")
    return status, stream.getvalue()


def copied(reference, folder, **over):
    """The reference's command with ``--out`` in ``folder`` (its copy) and the same trace file
    (the trace path is part of the configuration; a finished run writes no event to it)."""
    shutil.copytree(reference / "run", folder / "run")
    return config(folder, trace=str(reference / "run" / "trace.jsonl"), **over)


def config(folder, **over):
    values = dict(mode="spaced", interval_rate=1.5, epochs=EPOCHS, checkpoint_every=str(EVERY),
                  trace=str(folder / "run" / "trace.jsonl"))
    return tiny_config(folder, **{**values, **over})


def rows(state) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in state["metrics"]]


def assert_same_state(a: dict, b: dict) -> None:
    for group in ("models", "optimizers"):
        for role in a[group]:
            flat_a, flat_b = _flatten(a[group][role]), _flatten(b[group][role])
            assert flat_a.keys() == flat_b.keys()
            for k in flat_a:
                assert _equal(flat_a[k], flat_b[k]), f"{group}.{role}.{k} differs"
    for k, v in _flatten(a["engine"][0]).items():
        assert _equal(v, _flatten(b["engine"][0])[k]), f"engine.{k} differs"
    assert rows(a) == rows(b)


def _flatten(obj, prefix="") -> dict:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix: obj}


def _equal(x, y) -> bool:
    if isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and torch.equal(x, y)
    return x == y


@pytest.fixture(scope="module")
def reference(tmp_path_factory, digits_bundle):
    """The uninterrupted run, started by --resume auto in an empty folder."""
    folder = tmp_path_factory.mktemp("reference")
    status, text = auto(config(folder), digits_bundle)
    assert status == 0, text
    assert "resuming" not in text
    return folder


def test_checkpoint_every_parses_steps_and_durations():
    assert L == 5  # the step arithmetic of this module
    assert parse_checkpoint_every("epoch") == CheckpointEvery()
    assert parse_checkpoint_every("500") == CheckpointEvery(steps=500)
    assert parse_checkpoint_every("10m") == CheckpointEvery(seconds=600.0)
    assert parse_checkpoint_every("90s") == CheckpointEvery(seconds=90.0)
    assert parse_checkpoint_every("1.5h") == CheckpointEvery(seconds=5400.0)
    for bad in ("0", "-3", "10 minutes", "m", "0m", "often"):
        with pytest.raises(ValueError, match="checkpoint_every"):
            parse_checkpoint_every(bad)


def test_a_crash_after_a_mid_epoch_checkpoint_resumes_bitwise(tmp_path, digits_bundle,
                                                              reference, monkeypatch):
    saved = []
    real_save = ckpt.save_checkpoint

    def recording_save(out, payload):
        saved.append((payload["epoch"], payload["step_in_epoch"]))
        return real_save(out, payload)

    def crash_at(where, key):
        if where == "step" and key == 7:  # after the checkpoint of step 6
            raise Crash

    import spacedkd_fast.train.loop as loop

    monkeypatch.setattr(loop, "save_checkpoint", recording_save)
    monkeypatch.setattr(faults, "point", crash_at)
    with pytest.raises(Crash):
        auto(config(tmp_path), digits_bundle)
    # steps 2 and 4 of epoch 1, its end, then step 6 = epoch 2, step 1: atomic, so the last
    # complete one is on disk
    assert saved == [(0, 2), (0, 4), (1, 0), (1, 1)]
    state = ckpt.load_checkpoint(tmp_path / "run")
    assert (state["epoch"], state["step_in_epoch"]) == (1, 1)
    assert state["engine"][0]["replay"]["keys"]  # records pending across the checkpoint

    monkeypatch.undo()
    status, text = auto(config(tmp_path), digits_bundle)  # the same command again
    assert status == 0, text
    assert "resuming after epoch 1, step 1 of epoch 2" in text
    assert_same_state(ckpt.load_checkpoint(reference / "run"), ckpt.load_checkpoint(tmp_path / "run"))
    assert (tmp_path / "run" / "trace.jsonl").read_text() == \
        (reference / "run" / "trace.jsonl").read_text()


def test_checkpoints_within_epochs_do_not_change_the_weights(tmp_path, digits_bundle, reference):
    """--checkpoint-every may change on resume (it only adds checkpoints): the run with epoch-end
    checkpoints only trains to the same weights."""
    status, text = auto(config(tmp_path, checkpoint_every="epoch", trace=None), digits_bundle)
    assert status == 0, text
    a, b = ckpt.load_checkpoint(reference / "run"), ckpt.load_checkpoint(tmp_path / "run")
    for role in ("teacher", "student"):
        for k, v in a["models"][role].items():
            assert torch.equal(v, b["models"][role][k]), f"{role}.{k}"


def test_time_based_checkpoints_fall_on_log_points(tmp_path, digits_bundle, reference,
                                                  monkeypatch):
    """--checkpoint-every with a (tiny) duration: a checkpoint at every log point (--log-every 3:
    global steps 3, 6, 9) within the epochs, none elsewhere, and the same weights."""
    import spacedkd_fast.train.loop as loop

    saved = []
    real_save = ckpt.save_checkpoint
    monkeypatch.setattr(loop, "save_checkpoint", lambda out, payload: (
        saved.append((payload["epoch"], payload["step_in_epoch"])), real_save(out, payload))[1])
    status, text = auto(config(tmp_path, checkpoint_every="0.001s", trace=None), digits_bundle)
    assert status == 0, text
    assert saved == [(0, 3), (1, 0), (1, 1), (1, 4), (2, 0)]
    a, b = ckpt.load_checkpoint(reference / "run"), ckpt.load_checkpoint(tmp_path / "run")
    for role in ("teacher", "student"):
        for k, v in a["models"][role].items():
            assert torch.equal(v, b["models"][role][k]), f"{role}.{k}"


def test_the_rerun_of_a_finished_command_changes_nothing(tmp_path, digits_bundle, reference):
    cfg = copied(reference, tmp_path)
    before = (tmp_path / "run" / ckpt.CHECKPOINT_NAME).read_bytes()
    status, text = auto(cfg, digits_bundle)
    assert status == 0 and "already finished" in text
    assert (tmp_path / "run" / ckpt.CHECKPOINT_NAME).read_bytes() == before


def test_another_configuration_is_refused_naming_the_difference(tmp_path, digits_bundle,
                                                                reference):
    cfg = copied(reference, tmp_path, lr=0.1, alpha=0.5)
    with pytest.raises(runner.UserError) as info:
        auto(cfg, digits_bundle)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(f"--resume auto: {tmp_path / 'run'} holds a run of another "
                           "configuration: ")
    assert "--lr (saved 0.05, given 0.1)" in text and "--alpha (saved 0.3, given 0.5)" in text


def _edited(reference, folder, change):
    cfg = copied(reference, folder)
    path = folder / "run" / ckpt.CHECKPOINT_NAME
    state = torch.load(path, weights_only=True)
    change(state)
    ckpt.atomic_save(state, path)
    return cfg


def test_a_checkpoint_of_another_package_version_is_accepted_and_said(tmp_path, digits_bundle,
                                                                     reference):
    cfg = _edited(reference, tmp_path, lambda s: s.update(spacedkd_fast="0.0.9"))
    status, text = auto(cfg, digits_bundle)
    assert status == 0, text
    assert (f"the checkpoint was written by spacedkd_fast 0.0.9; continuing with "
            f"{runner.__version__} (the same checkpoint format)") in text


def test_a_configuration_this_version_cannot_read_is_refused_naming_it(tmp_path, digits_bundle,
                                                                     reference):
    cfg = _edited(reference, tmp_path, lambda s: s.update(
        spacedkd_fast="9.0", config={**s["config"], "warp_drive": 3}))
    with pytest.raises(runner.UserError) as info:
        auto(cfg, digits_bundle)
    text = str(info.value)
    assert "\n" not in text and "written by spacedkd_fast 9.0" in text
    assert "unknown setting 'warp_drive'" in text


def test_resume_auto_needs_an_out_folder(tmp_path, digits_bundle):
    cfg = config(tmp_path)
    cfg.out = None
    with pytest.raises(runner.UserError, match="--resume auto needs --out DIR"):
        runner.train(cfg, progress=False, data=digits_bundle, resume="auto")


# ---------------------------------------------------------------- another number of processes
def _engine_states(source, keys, world):
    """Every rank's replay records of ``keys`` as a run with ``world`` processes keeps them."""
    from spacedkd_fast.engine.trace import batch_checksum
    from spacedkd_fast.train.reshard import rank_view

    states = []
    for rank in range(world):
        view = rank_view(source, rank, world)
        shares = [view.batch(k) for k in keys]
        states.append({"n": 9, "trace_lines": 40 + rank, "replay": {
            "keys": list(keys), "sizes": [x.shape[0] for x, _ in shares],
            "checksums": [tuple(batch_checksum(x, y).tolist()) for x, y in shares],
            "batches": [None] * len(keys)}})
    return states


def test_replay_records_are_rebuilt_for_another_number_of_processes(digits_bundle):
    from spacedkd_fast.engine.trace import batch_checksum
    from spacedkd_fast.train.reshard import engine_state_for, rank_view

    source = digits_bundle.train  # one process: its batches are the global batches
    x, y = source.batch(4)
    for rank in (0, 1):  # a rank's view takes rows rank::2 of the global batch
        xr, yr = rank_view(source, rank, 2).batch(4)
        assert torch.equal(xr, x[rank::2]) and torch.equal(yr, y[rank::2])
    states = _engine_states(source, [3, 4, 7], world=2)
    one = engine_state_for(states, source, 0, 1)
    assert one["replay"]["keys"] == [3, 4, 7] and one["replay"]["sizes"] == [64, 64, 64]
    assert one["replay"]["checksums"] == [tuple(batch_checksum(*source.batch(k)).tolist())
                                          for k in (3, 4, 7)]
    assert one["trace_lines"] == 40 and one["n"] == 9
    back = engine_state_for(_engine_states(source, [3, 4, 7], world=1), source, 1, 2)
    assert back["replay"]["checksums"] == states[1]["replay"]["checksums"]  # rank 1's own rows
    assert back["trace_lines"] is None  # a new rank starts its own trace


def test_another_number_of_processes_is_refused_when_it_cannot_be_rebuilt(digits_bundle):
    from spacedkd_fast.train.errors import CheckpointError
    from spacedkd_fast.train.reshard import engine_state_for

    source = digits_bundle.train
    changed = _engine_states(source, [3, 4], world=2)
    changed[1]["replay"]["checksums"][1] = (1.0, 2.0, 3.0, 4.0)  # the data set changed since
    with pytest.raises(CheckpointError, match=r"cannot resume with 1 process\(es\) a run written "
                                              r"by 2: the data gives back another batch 4 than "
                                              r"process 1 recorded"):
        engine_state_for(changed, source, 0, 1)
    copies = _engine_states(source, [3], world=2)
    copies[0]["replay"]["batches"] = [source.batch(3)]
    with pytest.raises(CheckpointError, match="holds the batches themselves .* resume it with 2"):
        engine_state_for(copies, source, 0, 1)
