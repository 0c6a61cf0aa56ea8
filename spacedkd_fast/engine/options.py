"""Names of the engine's switches, importable without torch (the trainer's CLI offers them as
choices and answers ``--help`` without loading torch). The modules that act on a switch import
its names from here.
"""

REPLAY_KINDS = ("keyed", "fresh")
"""``keyed``: the student replays the teacher's recorded batches; ``fresh``: the official ViT loop
(the student trains on a second, independently shuffled stream of the source)."""

STUDENT_DATA = ("replay", "fresh")
"""Offline KD: the student replays the teacher's batches, or trains on fresh passes (official)."""

ZERO_INTERVAL = ("error", "online")
"""An interval ``int(L * s)`` of 0 steps: an error naming the smallest valid ``s``, or online KD
(the official code)."""

FEATURE_EXITS = ("all", "official")
"""Self KD: the feature loss on every shallow exit, or not on the layer-3 exit (official)."""

FIRST_REPLAY = ("interval", "one-epoch", "official")
"""Self KD's replay rules (names of ``spacing.FIRST_REPLAY_RULES`` that self KD can use)."""

TRIGGER_STEPS = ("ce-and-kd", "kd-only")
"""Self KD: the batch that fires a replay gets a CE-only step and a KD step, or the KD step only
(official)."""

FEATURE_KD = ("penultimate", "inter")
"""Feature KD on the penultimate features (projection head) or on intermediate block maps."""

PRESET_NAMES = ("official", "official-vit")
"""``compat=`` presets (``engine.compat.PRESETS`` holds what each turns on)."""

GRAPHED_MODES = ("base", "online", "spaced", "offline")
"""The pair distiller's modes whose steps ``cuda_graphs`` captures (:mod:`.graphed_steps`)."""
