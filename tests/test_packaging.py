"""What a plain (non-editable) install ships: the wheel built from this checkout, installed into
an empty folder and imported from there with the checkout off the path, finds every built-in
search space the way `cicl tune --space NAME` does, and holds every module of the package."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# run in the installed copy: load every space the checkout has by name (as `cicl tune --space`
# does), then list them; print where things came from
PROBE = """
import json, sys
import cicl
from cicl.sweep import load_space
loaded = {n: sorted(load_space(n).params) for n in json.loads(sys.argv[1])}
from cicl.sweep import builtin_spaces, spaces_dir
print(json.dumps({"cicl": cicl.__file__, "spaces_dir": str(spaces_dir()),
                  "listed": builtin_spaces(), "loaded": loaded}))
"""


def _build_wheel(tmp: Path) -> Path:
    """The wheel of a copy of the checkout (the build leaves its build/ and egg-info there,
    not in the repository), offline and with the installed setuptools."""
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("cicl", "tune"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    cmd = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation"]
    subprocess.run([*cmd, "-q", "-w", str(tmp / "dist")], check=True, env=env, timeout=300)
    (wheel,) = (tmp / "dist").glob("cicl-*.whl")
    return wheel


def test_wheel_ships_every_builtin_space_and_module(tmp_path):
    wheel = _build_wheel(tmp_path)
    site = tmp_path / "site"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), wheel],
        check=True,
        env=env,
        timeout=300,
    )
    names = sorted(p.stem for p in (REPO / "tune").glob("*.yaml"))
    assert {"default", "small", "large"} <= set(names)
    out = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(names)],
        cwd=tmp_path,  # not the checkout: `python -c` puts the working folder on sys.path
        env={**env, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(got["cicl"]).is_relative_to(site)  # the installed copy, not the checkout
    assert Path(got["spaces_dir"]).is_relative_to(site / "cicl")  # its package data
    assert got["listed"] == names
    assert all(got["loaded"][n] for n in names)
    # the packages are listed by hand in pyproject.toml: a new subpackage must not be left out
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "cicl").rglob("*.py")}
    with zipfile.ZipFile(wheel) as z:
        shipped = {n for n in z.namelist() if n.startswith("cicl/") and n.endswith(".py")}
    assert modules <= shipped, sorted(modules - shipped)
