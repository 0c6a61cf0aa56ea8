"""Smoke check of the CMake build (run by .ci/run, not collected by pytest).

Loads build/cmake/libspacedkd_ops.so into a process that has not imported spacedkd_fast and
checks one forward/backward of the op against a float64 computation.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F


def main(library: str) -> int:
    torch.ops.load_library(library)
    torch.manual_seed(0)
    s = torch.randn(16, 37, dtype=torch.float64)
    t = torch.randn(16, 37, dtype=torch.float64)
    y = torch.randint(0, 37, (16,))
    T, alpha = 2.0, 0.4
    loss, _, grad, _, _ = torch.ops.spacedkd.kd_loss_forward(s, t, y, T, alpha, T * T, -100, 1,
                                                             True)
    sr = s.clone().requires_grad_(True)
    ref = (1 - alpha) * F.cross_entropy(sr, y) + alpha * T * T * F.kl_div(
        F.log_softmax(sr / T, 1), F.log_softmax(t / T, 1), log_target=True, reduction="batchmean")
    ref.backward()
    ok = torch.allclose(loss, ref.detach(), atol=1e-12) and torch.allclose(grad, sr.grad, atol=1e-12)
    print(f"cmake build {library}: loss {loss.item():.12f} vs {ref.item():.12f}: {'ok' if ok else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1] if len(sys.argv) > 1 else "build/cmake/libspacedkd_ops.so"))
