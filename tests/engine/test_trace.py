"""trace.py: checksums (deterministic, order-sensitive) and the JSONL writer (resume)."""

import json

import pytest
import torch

from spacedkd_fast.engine.trace import TraceWriter, batch_checksum, read_trace


def test_checksum_matches_float64_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 4, 4, generator=g)
    y = torch.randint(0, 10, (5,), generator=g)
    cs = batch_checksum(x, y)
    assert cs.dtype == torch.float64 and cs.shape == (4,)
    rows = [float(x[i].double().sum()) for i in range(5)]
    ref = [sum(rows), sum((i + 1) * r for i, r in enumerate(rows)),
           float(y.double().sum()), float(sum((i + 1) * int(y[i]) for i in range(5)))]
    torch.testing.assert_close(cs, torch.tensor(ref, dtype=torch.float64), rtol=1e-12, atol=1e-9)


def test_checksum_is_bit_identical_for_equal_batches_and_sees_order():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 8, generator=g)
    y = torch.arange(6)
    assert torch.equal(batch_checksum(x, y), batch_checksum(x.clone(), y.clone()))
    perm = torch.tensor([1, 0, 2, 3, 4, 5])
    swapped = batch_checksum(x[perm], y[perm])
    assert swapped[0] == pytest.approx(float(batch_checksum(x, y)[0]))  # same plain sum
    assert not torch.equal(swapped, batch_checksum(x, y))  # but the digest differs
    assert not torch.equal(batch_checksum(x + 1e-3, y), batch_checksum(x, y))


def test_checksum_needs_a_batch_dimension():
    with pytest.raises(ValueError, match="batch dimension"):
        batch_checksum(torch.tensor(1.0), torch.tensor(1))


def test_writer_writes_one_object_per_line(tmp_path):
    path = tmp_path / "t.jsonl"
    w = TraceWriter(path)
    w.write("teacher_step", n=1, key=1, checksum=[1.5, 2.0, 3.0, 4.0])
    w.write("flush", replayed=0, dropped=3)
    w.close()
    lines = path.read_text().splitlines()
    assert [json.loads(s)["event"] for s in lines] == ["teacher_step", "flush"]
    assert read_trace(path)[0]["checksum"] == [1.5, 2.0, 3.0, 4.0]


def test_writer_resume_cuts_back_to_the_checkpoint(tmp_path):
    path = tmp_path / "t.jsonl"
    w = TraceWriter(path)
    for i in range(5):
        w.write("teacher_step", n=i + 1)
    w.close()
    r = TraceWriter(path)
    r.resume_from(3)  # the checkpoint was taken after 3 events; 2 were written after it
    r.write("teacher_step", n=99)
    r.close()
    assert [e["n"] for e in read_trace(path)] == [1, 2, 3, 99]
    bad = TraceWriter(tmp_path / "missing.jsonl")
    bad.resume_from(2)
    with pytest.raises(RuntimeError, match="cannot resume trace"):
        bad.write("flush")


def test_fresh_writer_truncates(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"event": "old"}\n')
    w = TraceWriter(path)
    w.write("new")
    w.close()
    assert [e["event"] for e in read_trace(path)] == ["new"]


def test_writer_creates_the_folders_of_its_path(tmp_path):
    path = tmp_path / "not" / "yet" / "t.jsonl"
    w = TraceWriter(path)
    w.write("flush", replayed=0, dropped=0)
    w.close()
    assert read_trace(path)[0]["event"] == "flush"
