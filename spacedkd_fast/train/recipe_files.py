"""Recipe files: the YAML recipes shipped in ``recipes/`` and the ``inherit:`` chains between them.

Files whose name starts with ``_`` hold values shared by several recipes (``inherit`` them); they
are not listed. No torch here (the CLI answers ``--list-recipes`` without it).
"""

from __future__ import annotations

import difflib
from collections.abc import Collection
from pathlib import Path
from typing import Any

import yaml

from .config_values import ConfigError

RECIPE_DIR = Path(__file__).resolve().parent / "recipes"


def list_recipes() -> dict[str, str]:
    """Recipe name -> its one-line description, for every YAML file shipped in ``recipes/``.

    """
    out = {}
    for path in sorted(RECIPE_DIR.glob("*.yaml")):
        if path.name.startswith("_"):
            continue
        data = yaml.safe_load(path.read_text()) or {}
        out[path.stem] = str(data.get("description", "")).strip()
    return out


def resolve_recipe(name_or_path: str) -> Path:
    """A YAML path as given, or the shipped recipe of that name (with or without ``.yaml``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    stem = path.name[:-5] if path.name.endswith(".yaml") else path.name
    shipped = RECIPE_DIR / f"{stem}.yaml"
    if path.parent == Path(".") and shipped.is_file():
        return shipped
    names = sorted(list_recipes())
    close = difflib.get_close_matches(stem, names, n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ConfigError(f"config file {name_or_path!r} not found (neither a file nor a shipped "
                      f"recipe).{hint} --list-recipes lists the {len(names)} shipped recipes.")


def load_yaml(name_or_path: str, valid_keys: Collection[str],
              _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a recipe file into a dict of field values, following ``inherit: <recipe>`` chains.

    ``inherit`` names one recipe or a list of them (merged in order, later ones win; the file's
    own values win over all). Keys may use dashes or underscores. Unknown keys are an error that
    names the close matches (``valid_keys``: the configuration's settings).
    """
    path = resolve_recipe(name_or_path)
    key = str(path.resolve())
    if key in _seen:
        raise ConfigError(f"recipe inheritance loops through {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of settings, got {type(data).__name__}")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    parents = data.pop("inherit", None)
    if parents is None:
        parents = []
    elif not isinstance(parents, list):
        parents = [parents]
    merged: dict[str, Any] = {}
    for parent in parents:
        merged.update(load_yaml(str(parent), valid_keys, _seen + (key,)))
        merged.pop("description", None)
    for k in data:
        if k not in valid_keys:
            close = difflib.get_close_matches(k, list(valid_keys), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"{path}: unknown setting {k!r}{hint}. Valid settings: "
                              f"{', '.join(valid_keys)}")
    merged.update(data)
    return merged
