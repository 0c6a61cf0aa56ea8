"""The engine's switch names (engine/options.py, torch-free) agree with the code that acts on them."""

from __future__ import annotations

import subprocess
import sys

from spacedkd_fast.engine import compat, options, spacing


def test_preset_names_are_the_presets_of_the_compat_table():
    assert set(options.PRESET_NAMES) == {name for _, name in compat.PRESETS}


def test_self_kd_replay_rules_are_spacing_rules():
    assert set(options.FIRST_REPLAY) <= set(spacing.FIRST_REPLAY_RULES)


def test_name_modules_import_without_torch():
    code = ("import sys, spacedkd_fast.engine.modes, spacedkd_fast.engine.options, "
            "spacedkd_fast.ops.names; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
