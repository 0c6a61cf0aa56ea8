"""The spacing engine: when the student learns and from which teacher. The mode table (``modes``),
the spacing schedule (``spacing``), replay records (``replay``), the machinery both distillers share
(``base``, ``step_io``), the two distillers (``spaced`` + ``spaced_replays``, ``self_kd``; both
re-exported by ``distill``), the official presets (``compat``), overlap lanes, the trace, the
projection head.

It knows batches only by key (``source.batch(key)``) and models only as modules; it imports nothing
from ``data/``, ``models/`` or ``train/``.
"""
