"""The spacing engine: when the student learns and from which teacher. The spacing schedule (pure
arithmetic), replay records, the distillers, overlap lanes, the trace and the projection head.

It knows batches only by key (``source.batch(key)``) and models only as modules; it imports nothing
from ``data/``, ``models/`` or ``train/``.
"""
