"""Loading the compiled extension when Python imports a source checkout that has none.

After a regular ``pip install .``, commands run from the checkout's root import the checkout's
``spacedkd_fast`` (the current folder comes first on ``sys.path``), which holds no compiled
``_C``. The loader then uses the installed copy's extension. Simulated with a fake installed tree:
a site folder holding only the built ``_C`` file, and a checkout-like folder without it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import spacedkd_fast
from spacedkd_fast.ops import kd_op

PACKAGE = Path(spacedkd_fast.__file__).resolve().parent


def _checkout_without_extension(root: Path) -> Path:
    """The package's Python files (the parts `spacedkd_fast.info` imports), no compiled file."""
    checkout = root / "checkout"
    target = checkout / "spacedkd_fast"
    (target / "ops").mkdir(parents=True)
    for name in ("__init__.py", "info.py"):
        shutil.copy(PACKAGE / name, target / name)
    for path in (PACKAGE / "ops").glob("*.py"):
        shutil.copy(path, target / "ops" / path.name)
    (checkout / "setup.py").write_text("# marks a source checkout\n")
    return checkout


def _site_with_extension(root: Path) -> Path:
    built = Path(kd_op._C.__file__)
    site = root / "site"
    (site / "spacedkd_fast").mkdir(parents=True)
    shutil.copy(built, site / "spacedkd_fast" / built.name)
    return site


def _site_packages_without_us(root: Path) -> Path:
    """This environment's site-packages (for torch and the rest) as links, minus any installed
    spacedkd_fast: after a regular install it holds a real copy that would hide the fake ones."""
    view = root / "site-packages-view"
    if not view.exists():
        view.mkdir()
        for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
            if not entry.name.lower().startswith(("spacedkd_fast", "__editable__")):
                (view / entry.name).symlink_to(entry)
    return view


def _run(cwd: Path, pythonpath: list[Path], code: str | None = None, module: str | None = None):
    """A fresh interpreter as after a regular install: ``-S`` keeps out the .pth hooks of this
    environment (an editable install's finder would resolve ``spacedkd_fast._C`` itself); torch
    comes from this environment's site-packages, given as a plain path entry."""
    purelib = _site_packages_without_us(cwd.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*map(str, pythonpath), str(purelib)])}
    env.pop("PYTHONSTARTUP", None)
    run = [sys.executable, "-S"] + (["-c", code] if code else ["-m", module])
    return subprocess.run(run, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_checkout_without_extension_uses_the_installed_copy(tmp_path):
    checkout = _checkout_without_extension(tmp_path)
    site = _site_with_extension(tmp_path)
    code = (
        "import torch, spacedkd_fast, spacedkd_fast.ops.kd_op as k, spacedkd_fast.info\n"
        "print(spacedkd_fast.__file__)\n"
        "print(k._C.__name__, k._C.__file__)\n"
        "s = torch.randn(4, 5, requires_grad=True)\n"
        "spacedkd_fast.kd_loss(s, torch.randn(4, 5), torch.tensor([0, 1, 2, 3])).backward()\n"
        "print(bool(torch.isfinite(s.grad).all()))\n"
        "raise SystemExit(spacedkd_fast.info.main([]))\n"
    )
    out = _run(checkout, [site], code=code)
    assert out.returncode == 0, out.stderr
    package_file, extension, finite, *info = out.stdout.strip().splitlines()
    assert Path(package_file).resolve().parent == (checkout / "spacedkd_fast").resolve()
    name, path = extension.split(" ", 1)
    assert name == "spacedkd_fast._C"
    assert Path(path).resolve().parent == (site / "spacedkd_fast").resolve()
    assert finite == "True"
    assert any("built against torch" in line for line in info)


def test_no_extension_anywhere_is_one_clear_line(tmp_path):
    checkout = _checkout_without_extension(tmp_path)
    out = _run(checkout, [], module="spacedkd_fast.info")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "has no compiled" in lines[0] or "was not found" in lines[0]
    assert "pip install --no-build-isolation -e ." in lines[0]
