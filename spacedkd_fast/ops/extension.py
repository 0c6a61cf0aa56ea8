"""Finds and loads the compiled extension ``spacedkd_fast._C`` (it registers ``torch.ops.spacedkd``).

Normally ``_C`` sits in the imported package folder. It does not when Python imports a source
checkout (``python -m spacedkd_fast.train`` run from the checkout's root after a regular
``pip install .``): the current folder comes first on ``sys.path``, and the checkout has no
compiled file. The package code is the same, so the extension of the installed copy is loaded
instead, under its own name, provided it was built for this Python. Where none exists the error
is one line that says what to run.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

_NAME = "spacedkd_fast._C"
_DIST = "spacedkd_fast"


def _package_dir() -> Path:
    return Path(__file__).resolve().parent.parent


def _suffixes() -> tuple[str, ...]:
    """File endings of extension modules this interpreter can import (ABI tag included)."""
    return tuple(importlib.machinery.EXTENSION_SUFFIXES)


def _from_distributions() -> list[Path]:
    """``_C`` files that installed ``spacedkd_fast`` distributions list in their RECORD."""
    found = []
    try:
        dists = list(importlib.metadata.distributions(name=_DIST))
    except Exception:  # pragma: no cover - broken metadata must not hide the real error
        return found
    for dist in dists:
        for entry in dist.files or ():
            parts = entry.parts
            if len(parts) == 2 and parts[0] == "spacedkd_fast" and parts[1].startswith("_C.") \
                    and parts[1].endswith(_suffixes()):
                found.append(Path(dist.locate_file(entry)))
    return found


def _from_sys_path() -> list[Path]:
    """``spacedkd_fast/_C*`` files in the folders of ``sys.path`` (site-packages included)."""
    found = []
    for entry in sys.path:
        folder = Path(entry or ".") / "spacedkd_fast"
        for suffix in _suffixes():
            candidate = folder / f"_C{suffix}"
            if candidate.is_file():
                found.append(candidate)
    return found


def installed_copies() -> list[Path]:
    """Compiled extensions outside the imported package folder, best first (no duplicates)."""
    own = _package_dir()
    seen, out = set(), []
    for path in _from_distributions() + _from_sys_path():
        try:
            resolved = path.resolve()
        except OSError:  # pragma: no cover
            continue
        if resolved.parent == own or resolved in seen or not resolved.is_file():
            continue
        seen.add(resolved)
        out.append(resolved)
    return out


def _load_file(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(_NAME, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(_NAME, None)
        raise
    package = sys.modules.get("spacedkd_fast")
    if package is not None:
        package._C = module
    return module


def _fix() -> str:
    if (_package_dir().parent / "setup.py").exists():
        return ("build it in this checkout with `pip install --no-build-isolation -e .` (or "
                "`python setup.py build_ext --inplace`)")
    return ("reinstall with `pip install --no-build-isolation .` in an environment that already "
            "has the torch you run with")


def load_extension() -> ModuleType:
    """Imports ``spacedkd_fast._C``, or the installed copy's when the imported folder has none.

    Raises ImportError with a one-line message naming the fix when no extension can be loaded.
    """
    own = _package_dir()
    try:
        return importlib.import_module(_NAME)
    except ImportError as exc:
        if any(own.glob("_C.*")):  # the file is there but does not load (symbols, ABI, torch)
            raise ImportError(
                f"spacedkd_fast's compiled extension in {own} could not be loaded ({exc}); "
                f"{_fix()}") from exc
    for path in installed_copies():
        try:
            return _load_file(path)
        except ImportError:
            continue
    raise ImportError(
        f"spacedkd_fast's compiled extension (_C) was not found: {own} has none and no installed "
        f"copy of spacedkd_fast has one; {_fix()}.") from None
