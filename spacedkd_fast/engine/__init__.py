"""The spacing engine: when the student learns and from which teacher. Modes (``modes``), the
spacing schedule (``spacing``), replay records (``replay``), the shared step/replay machinery
(``base``), the two distillers (``spaced``, ``self_kd``; both re-exported by ``distill``), overlap
lanes, the trace and the projection head.

It knows batches only by key (``source.batch(key)``) and models only as modules; it imports nothing
from ``data/``, ``models/`` or ``train/``.
"""
