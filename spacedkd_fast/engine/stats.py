"""Loss values the engine logs, kept on the device until someone reads them."""

from __future__ import annotations

import torch
from torch import Tensor


class LossStats:
    """Detached loss values kept on the device (folded into one sum every 256 values, so the
    list stays short); ``pop`` reads their means with one host transfer per device."""

    FOLD = 256

    def __init__(self) -> None:
        self.values: dict[str, list[Tensor]] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, value: Tensor) -> None:
        vals = self.values.setdefault(name, [])
        vals.append(value.detach())
        self.counts[name] = self.counts.get(name, 0) + 1
        if len(vals) >= self.FOLD:
            self.values[name] = [torch.stack([v.to(torch.float64) for v in vals]).sum()]

    def add_parts(self, parts: dict[str, Tensor] | None) -> None:
        for name, v in (parts or {}).items():
            self.add(name, v)

    def pop(self) -> dict[str, float]:
        by_device: dict[torch.device, list[str]] = {}
        for name, vals in self.values.items():
            by_device.setdefault(vals[0].device, []).append(name)
        out: dict[str, float] = {}
        for device, names in by_device.items():
            sums = torch.stack([torch.stack([v.to(device, torch.float64).reshape(())
                                             for v in self.values[n]]).sum() for n in names])
            out.update({n: v / self.counts[n] for n, v in zip(names, sums.tolist())})
        self.values, self.counts = {}, {}
        return out
