"""The README's offline install: the project's own wheel, installed with `pip --no-index --find-links` inside a
network namespace with no way out, holds the whole package (code and web assets) and runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_project_wheel_installs_from_a_wheelhouse_without_network(tmp_path: Path) -> None:
    wheelhouse, site = tmp_path / "wheelhouse", tmp_path / "site"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheelhouse), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    offline = ["unshare", "-n", sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links",
               str(wheelhouse), "--no-deps", "--target", str(site), "octomil-lite"]
    installed = subprocess.run(offline, capture_output=True, text=True, timeout=600)
    if installed.returncode != 0 and "unshare failed" in installed.stderr and os.environ.get("CI") != "true":
        pytest.skip(f"no network namespaces here: {installed.stderr.strip()}")
    assert installed.returncode == 0, installed.stderr
    # Dependencies come from this venv's site-packages, as a full wheelhouse would provide them; -S keeps the .pth
    # hook of this checkout's editable install from shadowing the installed wheel.
    import sysconfig

    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{site}:{sysconfig.get_paths()['purelib']}"}
    probe = ("import octomil_lite, pathlib; root = pathlib.Path(octomil_lite.__file__).parent; "
             "print(root); print((root / 'server' / 'web' / 'index.html').is_file())")
    ran = subprocess.run([sys.executable, "-S", "-c", probe], capture_output=True, text=True, env=env, timeout=60,
                         cwd=tmp_path)
    assert ran.stdout.split() == [str(site / "octomil_lite"), "True"], ran.stderr
    version = subprocess.run([sys.executable, "-S", "-m", "octomil_lite", "--version"], capture_output=True, text=True,
                             env=env, timeout=60, cwd=tmp_path)
    assert version.returncode == 0 and "octomil-lite" in version.stdout, version.stderr
