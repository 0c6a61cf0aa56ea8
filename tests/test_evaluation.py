"""``spacedkd_fast.evaluate``: top-1 / top-5 / loss against a naive float64 re-count, for plain,
``(features, logits)`` and multi-exit models, without the trainer."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch import nn

import spacedkd_fast as sk


class TableModel(nn.Module):
    """Returns preset logits: the input is the row index into ``table``."""

    def __init__(self, tables: list[torch.Tensor], form: str) -> None:
        super().__init__()
        self.tables = tables
        self.form = form
        self.dummy = nn.Parameter(torch.zeros(()))  # gives the model a device
        self.modes: list[bool] = []

    def forward(self, x):
        self.modes.append(self.training)
        rows = x.long()
        outs = [t[rows] for t in self.tables]
        if self.form == "logits":
            return outs[0]
        if self.form == "pair":
            return torch.zeros(len(rows), 4), outs[0]
        return [torch.zeros(len(rows), 4)] * len(outs), outs  # multi-exit


def naive(logits: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float]:
    """Top-1, top-5 and mean CE, one row at a time in float64."""
    t1 = t5 = 0
    ce = 0.0
    for row, target in zip(logits.double().tolist(), y.tolist()):
        better = sum(1 for v in row if v > row[target])  # no ties in the random tables
        t1 += better < 1
        t5 += better < 5
        m = max(row)
        ce += m + math.log(sum(math.exp(v - m) for v in row)) - row[target]
    n = len(y)
    return t1 / n, t5 / n, ce / n


def batches(y: torch.Tensor, size: int):
    idx = torch.arange(len(y))
    return [(idx[i:i + size].float(), y[i:i + size]) for i in range(0, len(y), size)]


@pytest.mark.parametrize("form", ["logits", "pair"])
def test_single_head_matches_a_naive_count(form):
    g = torch.Generator().manual_seed(1)
    n, c = 203, 12
    table = torch.randn(n, c, generator=g) * 3
    y = torch.randint(0, c, (n,), generator=g)
    model = TableModel([table], form)
    model.train()
    out = sk.evaluate(model, batches(y, 32))
    t1, t5, ce = naive(table, y)
    assert out["samples"] == n
    assert out["top1"] == pytest.approx(t1, abs=1e-12)
    assert out["top5"] == pytest.approx(t5, abs=1e-12)
    assert out["loss"] == pytest.approx(ce, rel=1e-6)
    assert 0 < t1 < t5 < 1  # the table is neither trivial nor perfect
    assert model.modes and not any(model.modes)  # evaluated in eval mode...
    assert model.training  # ...and given back in train mode


def test_multi_exit_reports_every_exit_and_the_ensemble():
    g = torch.Generator().manual_seed(2)
    n, c = 150, 10
    tables = [torch.randn(n, c, generator=g) * s for s in (1.0, 2.0, 3.0)]
    y = torch.randint(0, c, (n,), generator=g)
    out = sk.evaluate(TableModel(tables, "multi"), batches(y, 64))
    for i, t in enumerate(tables, start=1):
        t1, t5, _ = naive(t, y)
        assert out[f"exit{i}_top1"] == pytest.approx(t1, abs=1e-12)
        assert out[f"exit{i}_top5"] == pytest.approx(t5, abs=1e-12)
    e1, e5, _ = naive(sum(t.double() for t in tables) / 3, y)
    assert out["ensemble_top1"] == pytest.approx(e1, abs=1e-12)
    assert out["top1"] == out["ensemble_top1"] and out["top5"] == out["ensemble_top5"]
    assert out["loss"] == pytest.approx(naive(tables[-1], y)[2], rel=1e-6)  # the deepest exit


def test_keyed_items_and_a_real_dataloader_are_accepted():
    g = torch.Generator().manual_seed(3)
    n, c = 40, 6
    table = torch.randn(n, c, generator=g)
    y = torch.randint(0, c, (n,), generator=g)
    ds = torch.utils.data.TensorDataset(torch.arange(n).float(), y)
    via_loader = sk.evaluate(TableModel([table], "pair"), torch.utils.data.DataLoader(ds, 16))
    keyed = [(k + 1, b) for k, b in enumerate(batches(y, 16))]
    via_keys = sk.evaluate(TableModel([table], "pair"), keyed)
    assert via_loader["top1"] == via_keys["top1"] == pytest.approx(naive(table, y)[0], abs=1e-12)


def test_bad_inputs_say_what_is_expected():
    model = TableModel([torch.randn(4, 3)], "pair")
    with pytest.raises(ValueError, match="no batches"):
        sk.evaluate(model, [])

    class Weird(nn.Module):
        def forward(self, x):
            return {"logits": x}

    with pytest.raises(TypeError, match="must return logits"):
        sk.evaluate(Weird(), [(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))])


def test_the_library_function_does_not_load_the_trainer():
    code = ("import sys, torch, spacedkd_fast as sk; m = torch.nn.Linear(3, 4); "
            "sk.evaluate(m, [(torch.randn(5, 3), torch.tensor([0, 1, 2, 3, 0]))]); "
            "print(sorted(k for k in sys.modules if k.startswith('spacedkd_fast.train')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
