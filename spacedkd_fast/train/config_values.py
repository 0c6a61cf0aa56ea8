"""Turning YAML and command-line values into the typed values of the configuration's settings.

Split from ``config.py``: :func:`coerce` knows the value shapes (numbers, switches, lists such as
``0,6,11``, ``KEY=VALUE`` options, ``t2`` for ``kd_scale``); ``config.py`` knows which setting has
which default and wraps any ``ValueError`` / ``TypeError`` into one error naming the setting.
No torch here (the CLI answers ``--help`` without it).
"""

from __future__ import annotations

from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value or file that cannot be used; the message says what is expected."""


# List-valued settings and the type of their elements.
LIST_FIELDS: dict[str, type] = {"milestones": float, "inter_student_blocks": int,
                                "inter_teacher_blocks": int}
KD_SCALE_T2 = ("t2", "t*t", "t^2", "hinton")  # spellings of kd_scale = T*T (stored as None)
# the choices of a three-way setting; such a setting also takes a switch's spellings: YAML reads
# ``on`` as true, and configurations saved before channels_last had "auto" hold true / false
AUTO_ON_OFF = ("auto", "on", "off")


def coerce(name: str, value: Any, default: Any, type_text: str,
           choices: tuple | None = None) -> Any:
    """``value`` (not None) as the type of setting ``name`` whose default is ``default`` and whose
    annotation reads ``type_text``; raises ``ValueError`` / ``TypeError`` when it cannot be."""
    if name == "kd_scale":
        if isinstance(value, str) and value.strip().lower() in KD_SCALE_T2:
            return None
        return float(value)
    if name.endswith("kwargs"):
        return parse_kwargs(value)
    if name in LIST_FIELDS:
        if isinstance(value, str):
            value = [v for v in value.replace(" ", "").split(",") if v]
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [number(LIST_FIELDS[name], v) for v in value]
    if choices == AUTO_ON_OFF:
        return auto_switch(value)
    if name == "seeds":
        if isinstance(value, (list, tuple)):
            return ",".join(str(number(int, v)) for v in value)
        return str(value).replace(" ", "")
    if isinstance(default, bool):
        return switch(value)
    if isinstance(default, (int, float)):
        return number(type(default), value)
    if type_text.startswith("bool"):  # an optional switch (default None)
        return switch(value)
    if type_text.startswith(("int", "float")):  # optional numbers (default None)
        return number(int if type_text.startswith("int") else float, value)
    return str(value)


def switch(value: Any) -> bool:
    """A bool from ``True``/``1``/``"yes"``/``"on"``/... (and their negatives)."""
    if isinstance(value, str):
        low = value.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(value)
    if not isinstance(value, (bool, int)):
        raise ValueError(value)
    return bool(value)


def auto_switch(value: Any) -> str:
    """``auto``, ``on`` or ``off`` from the word or a switch (``True``, ``"yes"``, ``0``, ...);
    other words pass through (validation names the choices)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        return "on" if switch(value) else "off"
    except ValueError:
        return str(value)


def number(kind: type, value: Any) -> int | float:
    """``value`` as ``kind`` (int or float); bools and fractional ints are refused."""
    if isinstance(value, bool):
        raise ValueError(value)
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return int(value)  # a string such as "1.5" raises too
    return float(value)


def parse_kwargs(value: Any) -> dict[str, Any]:
    """``{"k": v}`` from a mapping or from ``"k=v,k2=v2"`` (values read as YAML scalars)."""
    if isinstance(value, dict):
        return {str(k): v for k, v in value.items()}
    if not isinstance(value, str):
        raise ValueError(value)
    out: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in value.split(","))):
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(value)
        out[key.strip()] = yaml.safe_load(text)
    return out
