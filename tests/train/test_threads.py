"""``--threads`` (issue 22): a run's CPU thread count is settled once (0 = auto), used, printed in
the run header and recorded in config.yaml; a resume runs with the recorded count; the caller's
torch thread count is given back after the run."""

from __future__ import annotations

import io
import os

import pytest
import torch
import yaml
from run_helpers import run, tiny_config

from spacedkd_fast.train import runner
from spacedkd_fast.train.cli import main
from spacedkd_fast.train.threads import settled_threads


def _header_threads(text: str) -> str:
    line = next(ln for ln in text.splitlines() if ln.startswith("spacedkd_fast "))
    return line.split("device cpu, ")[1].split(",")[0]


def test_threads_are_used_printed_recorded_and_kept_on_resume(tmp_path, digits_bundle):
    before = torch.get_num_threads()
    n = 2 if before == 1 else 1
    cfg = tiny_config(tmp_path, mode="online", epochs=1, threads=n)
    status, text = run(cfg, data=digits_bundle)
    assert status == 0
    assert _header_threads(text) == f"{n} CPU thread" + ("s" if n > 1 else "")
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["threads"] == n
    assert torch.get_num_threads() == before  # given back
    # extended without --threads: the recorded count, not auto
    stream = io.StringIO()
    assert runner.resume(tmp_path / "run", overrides={"epochs": 2}, progress=False,
                         data=digits_bundle, stream=stream) == 0
    assert _header_threads(stream.getvalue()) == _header_threads(text)
    assert torch.get_num_threads() == before


def test_auto_is_recorded_as_a_number(tmp_path, digits_bundle, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # auto honours it, as torch does at start-up
    before = torch.get_num_threads()
    status, text = run(tiny_config(tmp_path, mode="base", epochs=1), data=digits_bundle)
    assert status == 0
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["threads"] == 3
    assert _header_threads(text) == "3 CPU threads"
    assert torch.get_num_threads() == before


def test_auto_rule(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert settled_threads(0, "cpu", world_size=1) == min(torch.get_num_threads(), cores)
    assert settled_threads(0, "cpu", world_size=2) == max(1, cores // 2)
    assert settled_threads(0, "cuda:0", world_size=2) == min(torch.get_num_threads(), cores)
    assert settled_threads(5, "cpu", world_size=2) == 5  # given: kept
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert settled_threads(0, "cpu", world_size=2) == 4


def test_a_negative_count_is_refused_in_one_line(capsys, tmp_path):
    assert main(["--dataset", "digits", "--device", "cpu", "--threads", "-1",
                 "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "threads must be zero or more, got -1" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("given", [["--threads", "2"], []])
def test_print_config_shows_the_number(capsys, monkeypatch, given):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    capsys.readouterr()
    assert main(["--dataset", "digits", "--device", "cpu", *given, "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["threads"] == (2 if given else 1)


@pytest.mark.parametrize("written, world, device, given, expected", [
    (1, 2, "cpu", {}, 1),              # 1 process's 2 threads, now 2 processes on 2 cores: 1 each
    (2, 1, "cpu", {}, 2),              # 2 processes' 1 thread, now 1 process: both cores
    (1, 1, "cpu", {}, 2),              # the same number of processes: the saved count (bitwise)
    (1, 2, "cpu", {"threads": 2}, 2),  # the command names --threads: kept
    (1, 2, "cuda", {}, 2),             # not a CPU run: kept
])
def test_a_resume_with_another_number_of_processes_settles_auto_anew(
        tmp_path, monkeypatch, written, world, device, given, expected):
    from spacedkd_fast.train import threads
    from spacedkd_fast.train.distributed import DistInfo
    from spacedkd_fast.train.resuming import refit_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    saved = 2 if written == 1 else 1  # what auto gave the run that wrote the checkpoint
    cfg = tiny_config(tmp_path, threads=saved)
    state = {"engine": [{}] * written}
    info = DistInfo(rank=0, world_size=world, local_rank=0, device=torch.device(device))
    notes = refit_threads(cfg, state, info, given)
    assert cfg.threads == expected
    if expected != saved:
        assert notes == [f"CPU threads per process: {expected}, auto for {world} process(es) "
                         f"(the checkpoint's run used {saved}; --threads N sets it)"]
    else:
        assert notes == []
