"""Fault injection for the cluster tests (``tests/train/test_cluster_faults.py``): a process that
kills itself with SIGKILL at a chosen point, the way a preempted or crashed node takes a worker
away, so that torchrun's restart and the resume can be tested deterministically.

Set ``SPACEDKD_FAULT=RANK:WHERE`` in the environment, ``WHERE`` being ``step=K`` (after the
training step with key ``K``) or ``save=K`` (on the first checkpoint save at or after step ``K``,
once every rank's state is gathered: while rank 0 writes the file). It fires on the first attempt
of a torchrun job only (``TORCHELASTIC_RESTART_COUNT`` unset or 0), so the restarted workers run
through. Unset (always, outside those tests), each check is one comparison.
"""

from __future__ import annotations

import os
import signal


def _parse(text: str | None) -> tuple[int, str, int] | None:
    if not text or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return None
    rank, _, where = text.partition(":")
    point, _, key = where.partition("=")
    return int(rank), point, int(key)


_FAULT = _parse(os.environ.get("SPACEDKD_FAULT"))


def point(where: str, key: int) -> None:
    """Die here when ``SPACEDKD_FAULT`` names this rank, this point and (at least) this step."""
    if _FAULT is None:
        return
    rank, point_name, at = _FAULT
    if point_name == where and key >= at and int(os.environ.get("RANK", "0")) == rank:
        os.kill(os.getpid(), signal.SIGKILL)
