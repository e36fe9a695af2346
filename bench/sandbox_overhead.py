#!/usr/bin/env python3
"""Per-job cost of conversion isolation: the same jobs, unisolated and isolated, alternating in one run.

Run by hand (not part of the test suite):

    python bench/sandbox_overhead.py --runs 20

"before" is a plain child process (what --unsafe-conversions runs, and what every job was before issue 12);
"after" is the bubblewrap job (namespaces, seccomp, cgroup, read-only binds, tmpfs scratch). Three jobs:
`/bin/true` (the launcher alone), `python -I -c pass` (an interpreter start), and the real `check-onnx` worker
task on a small ONNX file (what every ONNX upload runs). Each figure is a median in milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from octomil_lite.convert.sandbox import CHECK_LIMITS, JobFiles, Sandbox


def small_onnx(path: Path) -> None:
    import numpy as np
    from skl2onnx import to_onnx
    from sklearn.linear_model import LinearRegression

    x = np.random.RandomState(0).rand(20, 3).astype(np.float32)
    path.write_bytes(to_onnx(LinearRegression().fit(x, x.sum(axis=1)), x[:1]).SerializeToString())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    isolated, plain = Sandbox(hidden=[]), Sandbox(hidden=[], isolated=False)
    isolation = isolated.probe()
    if not isolation.available:
        raise SystemExit(f"isolation unavailable: {isolation.reason}")
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model.onnx"
        small_onnx(model)
        jobs = {
            "/bin/true": (["/bin/true"], None),
            "python -I -c pass": ([sys.executable, "-I", "-c", "pass"], None),
            "check-onnx task": ([sys.executable, "-I", "-m", "octomil_lite.convert.worker", "check-onnx"],
                                JobFiles({"model": model})),
        }
        print(f"containment: {isolation.containment}; {args.runs} runs each, alternating; median ms (p90)\n")
        print("| job | before: plain child | after: isolated job | overhead |")
        print("|---|---:|---:|---:|")
        for name, (argv, files) in jobs.items():
            times: dict[str, list[float]] = {"plain": [], "isolated": []}
            for _ in range(args.runs):
                for label, sandbox in (("plain", plain), ("isolated", isolated)):
                    start = time.perf_counter()
                    done = sandbox.run_sync(argv, CHECK_LIMITS, stdin=b"{}", files=files)
                    times[label].append((time.perf_counter() - start) * 1000)
                    assert done.returncode == 0, done.stderr.decode()[-500:]
            p, i = (statistics.median(times[k]) for k in ("plain", "isolated"))
            p90 = {k: sorted(v)[int(len(v) * 0.9) - 1] for k, v in times.items()}
            print(f"| {name} | {p:.1f} ({p90['plain']:.1f}) | {i:.1f} ({p90['isolated']:.1f}) | +{i - p:.1f} ms |")


if __name__ == "__main__":
    main()
