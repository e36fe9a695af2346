#!/usr/bin/env python3
"""Start-up of the one-file build (dist/octomil-lite) next to the installed command, in the same run.

Run by hand after scripts/build-onefile:  python bench/onefile.py [--runs 7]
Cold = a fresh, empty cache directory (the first start unpacks); warm = the cache already unpacked. Every server
it starts is stopped before it exits.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ONEFILE = ROOT / "dist" / "octomil-lite"


def timed(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env, timeout=300)
    return time.perf_counter() - started


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def to_health(command: list[str], env: dict[str, str], data_dir: Path) -> float:
    """Seconds from exec to the first 200 from /health."""
    port = free_port()
    started = time.perf_counter()
    proc = subprocess.Popen([*command, "serve", "--port", str(port), "--data-dir", str(data_dir)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = started + 120
        while time.perf_counter() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as resp:
                    if resp.status == 200:
                        return time.perf_counter() - started
            except OSError:
                time.sleep(0.01)
        raise RuntimeError("no /health within 120 s")
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    installed = [sys.executable, "-m", "octomil_lite"]
    work = Path(tempfile.mkdtemp(prefix="onefile-bench-"))
    env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "OCTOMIL_LITE_CACHE_DIR": str(work / "cache")}
    try:
        cold = []
        for _ in range(min(args.runs, 3)):
            shutil.rmtree(work / "cache", ignore_errors=True)
            cold.append(timed([str(ONEFILE), "--help"], env))
        rows = {
            "cold --help (first start: check + unpack)": cold,
            "warm --help": [timed([str(ONEFILE), "--help"], env) for _ in range(args.runs)],
            "installed --help (baseline)": [timed([*installed, "--help"], env) for _ in range(args.runs)],
            "warm serve to first /health": [to_health([str(ONEFILE)], env, work / f"d{i}") for i in range(args.runs)],
            "installed serve to first /health (baseline)": [to_health(installed, env, work / f"i{i}")
                                                             for i in range(args.runs)],
        }
        load = os.getloadavg()[0]
        unpacked = sum(p.stat().st_size for p in (work / "cache").rglob("*") if p.is_file())
        print(f"file {ONEFILE.stat().st_size / 2**20:.0f} MiB, unpacked {unpacked / 2**20:.0f} MiB, "
              f"load {load:.1f}\n")
        print("| measure | median s | min s | runs |\n|---|---|---|---|")
        for name, values in rows.items():
            print(f"| {name} | {statistics.median(values):.2f} | {min(values):.2f} | {len(values)} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
