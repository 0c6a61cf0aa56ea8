"""Whose signals a run takes: SIGTERM only for the run's duration, and SIGINT only in the
trainer's own process (``python -m spacedkd_fast.train``), never from code that started the run
in-process (a test runner: one Ctrl-C must stop pytest, not a test's training run)."""

from __future__ import annotations

import io
import os
import signal
import threading

import pytest
from run_helpers import tiny_config

from spacedkd_fast.train import runner, stop
from spacedkd_fast.train.stop import StopRequest


class _Recorder(io.StringIO):
    """A console stream that notes the signal handlers in place whenever the run prints, and can
    send this process a Ctrl-C once the first epoch line is out."""

    def __init__(self, ctrl_c: bool = False) -> None:
        super().__init__()
        self.seen: list[tuple[object, object]] = []
        self.ctrl_c = ctrl_c

    def write(self, text: str) -> int:
        self.seen.append((signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)))
        if self.ctrl_c and text.startswith("epoch"):
            self.ctrl_c = False
            os.kill(os.getpid(), signal.SIGINT)
        return super().write(text)


@pytest.fixture
def default_ctrl_c():
    """Python's own SIGINT handler while the test runs (what pytest leaves in place), restored."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_an_in_process_run_takes_sigterm_for_its_duration_and_never_sigint(
        tmp_path, digits_bundle, default_ctrl_c):
    term_before = signal.getsignal(signal.SIGTERM)
    stream = _Recorder()
    status = runner.train(tiny_config(tmp_path, epochs=1), progress=False, data=digits_bundle,
                          stream=stream)
    assert status == 0
    # Ctrl-C is left to the caller throughout; SIGTERM is the run's while it trains (the epoch
    # line is printed inside the loop) and nobody's after
    assert all(sigint is signal.default_int_handler for sigint, _ in stream.seen)
    ours = [isinstance(getattr(term, "__self__", None), StopRequest) for _, term in stream.seen]
    assert any(ours) and not ours[-1]  # the summary comes after the loop
    # nothing outlives the run
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is term_before


def test_ctrl_c_during_an_in_process_run_reaches_the_caller(tmp_path, digits_bundle,
                                                            default_ctrl_c):
    term_before = signal.getsignal(signal.SIGTERM)
    stream = _Recorder(ctrl_c=True)
    cfg = tiny_config(tmp_path, epochs=2)
    with pytest.raises(KeyboardInterrupt):  # not swallowed into an exit status 130
        runner.train(cfg, progress=False, data=digits_bundle, stream=stream)
    assert signal.getsignal(signal.SIGTERM) is term_before


def test_cli_main_called_in_process_hands_ctrl_c_on(monkeypatch, default_ctrl_c):
    """main's own handling of an interrupt (the run itself is interrupted for real above): in the
    trainer's process it is exit status 130, called by other code it is that code's exception."""
    from spacedkd_fast.train import cli

    def interrupted(ns, cli_values):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["--epochs", "1"])
    monkeypatch.setattr(stop, "_PROCESS_IS_OURS", True)
    assert cli.main(["--epochs", "1"]) == 130


def test_the_trainers_own_process_takes_both_and_restores_them(monkeypatch, default_ctrl_c):
    monkeypatch.setattr(stop, "_PROCESS_IS_OURS", True)
    term_before = signal.getsignal(signal.SIGTERM)
    with StopRequest() as request:
        assert signal.getsignal(signal.SIGINT) == request._handle
        assert signal.getsignal(signal.SIGTERM) == request._handle
        os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C is a request, not an exception
        assert request.requested and request.exit_status == 130
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is term_before


def test_a_ctrl_c_handler_of_the_embedding_code_is_respected(monkeypatch):
    monkeypatch.setattr(stop, "_PROCESS_IS_OURS", True)

    def theirs(signum, frame):
        pass

    before = signal.signal(signal.SIGINT, theirs)
    try:
        with StopRequest():
            assert signal.getsignal(signal.SIGINT) is theirs
        assert signal.getsignal(signal.SIGINT) is theirs
    finally:
        signal.signal(signal.SIGINT, before)


def test_outside_the_main_thread_no_handler_is_installed(monkeypatch):
    monkeypatch.setattr(stop, "_PROCESS_IS_OURS", True)
    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    seen = []

    def body():
        with StopRequest() as request:
            seen.append(request.signals())

    t = threading.Thread(target=body)
    t.start()
    t.join(10)
    assert seen == [()]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_repeated_sigterm_still_saves_and_a_second_ctrl_c_aborts(monkeypatch, default_ctrl_c):
    """SLURM signals every process of a job step and torchrun's agent passes SIGTERM on: a worker
    receives it twice and must still save; a user's second Ctrl-C means stop now."""
    monkeypatch.setattr(stop, "_PROCESS_IS_OURS", True)
    with StopRequest() as request:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert request.requested and request.exit_status == 143
    with StopRequest() as request, pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        assert request.requested
        os.kill(os.getpid(), signal.SIGINT)
