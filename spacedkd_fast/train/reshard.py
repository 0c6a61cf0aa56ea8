"""Resuming a run with another number of processes: the engine state for the new ranks.

What carries over unchanged: the global batch (``batch_size`` is global; each rank takes rows
``r::world_size`` of every keyed batch), the keys, the counters, the projector and the pending
replay keys, which are the same on every rank. What is per rank: the replay records' shares of each
pending batch (their size and checksum) and the trace file. A checkpoint holds every rank's, so
the records are rebuilt for the new ranks from the keyed source, after checking that the source
still gives back, for every old rank, exactly the share that rank recorded (the checksums). The
replays of the resumed run then verify against the new records as usual.
"""

from __future__ import annotations

import copy
from typing import Any

from ..engine.trace import batch_checksum
from .errors import CheckpointError


def rank_view(source: Any, rank: int, world_size: int) -> Any:
    """``source`` as rank ``rank`` of ``world_size`` sees it (a shallow copy; the data shared)."""
    if hasattr(source, "inner"):  # a wrapper of another source (channels_last batches)
        return type(source)(rank_view(source.inner, rank, world_size))
    indexer = copy.copy(source.indexer)
    indexer.rank, indexer.world_size = int(rank), int(world_size)
    view = copy.copy(source)
    view.indexer = indexer
    return view


def _floats(checksum: Any) -> tuple[float, ...]:
    return tuple(float(v) for v in (checksum.tolist() if hasattr(checksum, "tolist") else checksum))


def engine_state_for(engines: list[dict[str, Any]], source: Any, rank: int, world_size: int
                     ) -> dict[str, Any]:
    """The engine state of rank ``rank`` of ``world_size`` from the states of every rank of a run
    with ``len(engines)`` processes; ``CheckpointError`` (one line) when it cannot be rebuilt."""
    old_world = len(engines)
    refuse = f"cannot resume with {world_size} process(es) a run written by {old_world}"
    replay = engines[0]["replay"]
    if any(b is not None for b in replay["batches"]):
        raise CheckpointError(f"{refuse}: its replay buffer holds the batches themselves (copy "
                              f"replay, one share per process); resume it with {old_world}")
    keys = list(replay["keys"])
    if any(not isinstance(k, int) for k in keys):
        raise CheckpointError(f"{refuse}: its pending replay keys are not global steps; resume it "
                              f"with {old_world}")
    if any(list(e["replay"]["keys"]) != keys for e in engines):
        raise CheckpointError(f"{refuse}: its processes recorded different pending keys (the "
                              "checkpoint is inconsistent)")
    if not hasattr(getattr(source, "inner", source), "indexer") or "dali" in str(
            getattr(source, "backend", "")):
        raise CheckpointError(f"{refuse}: the {getattr(source, 'backend', 'data')} source cannot "
                              f"regenerate another process's share; resume it with {old_world}")
    old_views = [rank_view(source, r, old_world) for r in range(old_world)]
    mine = rank_view(source, rank, world_size)
    sizes, checksums = [], []
    for i, key in enumerate(keys):
        for r, view in enumerate(old_views):
            saved = engines[r]["replay"]["checksums"][i]
            if saved is None:
                continue
            x, y = view.batch(key)
            if _floats(batch_checksum(x, y)) != _floats(saved):
                raise CheckpointError(
                    f"{refuse}: the data gives back another batch {key} than process {r} "
                    "recorded (has the data set changed since?)")
        x, y = mine.batch(key)
        sizes.append(int(x.shape[0]))
        checksums.append(_floats(batch_checksum(x, y)))
    state = dict(engines[0])
    state["replay"] = {"keys": keys, "sizes": sizes, "checksums": checksums,
                       "batches": [None] * len(keys)}
    # a rank that existed continues its trace file; a new one starts its own
    state["trace_lines"] = engines[rank]["trace_lines"] if rank < old_world else None
    return state
