#!/usr/bin/env python3
"""A/B one change of the server on the same seeded registry: alternate the trees, run wrk and latency series.

    python bench/ab.py --data /tmp/octomil-bench/big A=/work/main B=/tmp/exp --rounds 3

Each NAME=DIR puts DIR first on PYTHONPATH (DIR/octomil_lite is the package under test). Rounds alternate
A, B, A, B... so that a machine that gets busier or quieter affects both alike; medians are reported.
Loopback only; every server is stopped before the next starts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run


def serve(tree: Path, data: Path, logfile: Path) -> run.Octomil:
    server = run.Octomil(data, logfile)
    env = {**os.environ, "PYTHONPATH": str(tree)}
    server.key = subprocess.run([sys.executable, "-m", "octomil_lite.cli", "keys", "create", "--name",
                                 f"ab-{time.monotonic_ns()}", "--scope", "admin", "--data-dir", str(data)],
                                capture_output=True, text=True, check=True, env=env, timeout=60).stdout.strip()
    with open(logfile, "ab") as out:
        t0 = time.monotonic()
        server.proc = subprocess.Popen([sys.executable, "-m", "octomil_lite.cli", "serve", "--host", run.HOST, "--port",
                                        str(server.port), "--data-dir", str(data), "--rate-limit", "0",
                                        "--log-level", "warning"], stdout=out, stderr=out, env=env,
                                       start_new_session=True)
    server.startup = run.wait_http(server.port, "/health", t0 + 60, server.proc) - t0
    return server


def transfer_ab(args: argparse.Namespace) -> int:
    trees = dict(t.split("=", 1) for t in args.trees)
    work = Path("/tmp/octomil-bench-ab")
    work.mkdir(exist_ok=True)
    times: dict[str, dict[str, list[float]]] = {name: {"upload": [], "download": [], "hwm": []} for name in trees}
    for rnd in range(args.rounds):
        for name, tree in trees.items():
            server = serve(Path(tree), args.data, work / "serve.log")
            try:
                c = server.client()
                _, body, _ = c.call("POST", "/api/v1/models", {"framework": "sklearn"})
                c.close()
                model_id = json.loads(body)["id"]
                auth = f"Authorization: Bearer {server.key}"
                base = f"http://{run.HOST}:{server.port}/api/v1/models/{model_id}/versions"
                os.sync()
                run.reset_peak(server.pid)
                form = f"file=@{args.transfer};filename=m.pkl"
                code, t_up, out = run.curl(["-H", auth, "-F", form, f"{base}/upload"])
                assert code == 201, out
                c = server.client()
                run.wait_conversion(c, model_id)
                c.close()
                run.curl(["-H", auth, "-o", "/dev/null", f"{base}/1/download"])
                code, t_dl, _ = run.curl(["-H", auth, "-o", "/dev/null", f"{base}/1/download"])
                hwm = run.proc_status(server.pid, "VmHWM")
                for k, v in (("upload", t_up), ("download", t_dl), ("hwm", hwm)):
                    times[name][k].append(v)
                run.log(f"round {rnd + 1} {name}: upload {t_up:.2f}s download {t_dl:.2f}s VmHWM {hwm >> 20} MiB "
                        f"(load {run.load()})")
            finally:
                server.stop()
    for name, r in times.items():
        print(f"{name}: upload {run.median(r['upload']):.2f} s, download {run.median(r['download']):.2f} s, "
              f"VmHWM max {max(r['hwm']) >> 20} MiB")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("trees", nargs="+", help="NAME=DIR")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--ops", type=int, default=300)
    ap.add_argument("--transfer", type=Path, default=None,
                    help="instead: time curl upload and download of this file (os.sync() before each upload)")
    args = ap.parse_args()
    if args.transfer:
        return transfer_ab(args)
    trees = dict(t.split("=", 1) for t in args.trees)
    results: dict[str, dict[str, list[float]]] = {name: {} for name in trees}
    work = Path("/tmp/octomil-bench-ab")
    work.mkdir(exist_ok=True)
    for rnd in range(args.rounds):
        for name, tree in trees.items():
            server = serve(Path(tree), args.data, work / "serve.log")
            try:
                c = server.client()
                _, body, _ = c.call("GET", "/api/v1/models?limit=1&offset=10")
                some_id = json.loads(body)["models"][0]["id"]
                ops = {"get": lambda i, some_id=some_id: ("GET", f"/api/v1/models/{some_id}", None),
                       "list-20": lambda i: ("GET", "/api/v1/models?limit=20", None)}
                lat = run.latencies(c, ops, args.ops, 20, 30)
                c.close()
                cpu0 = run.cpu_seconds(server.pid)
                w = run.wrk(server.port, server.key, f"/api/v1/models/{some_id}", args.clients, args.seconds, work)
                cpu = (run.cpu_seconds(server.pid) - cpu0) / max(1, w["requests"])
                r = results[name]
                for k, v in {"get p50": run.median(lat["get"]), "list-20 p50": run.median(lat["list-20"]),
                             "wrk rps": w["rps"], "wrk p50": w["p50"], "wrk p99": w["p99"],
                             "wrk errors": w["errors"], "server cpu per request": cpu}.items():
                    r.setdefault(k, []).append(v)
                run.log(f"round {rnd + 1} {name}: get p50 {run.ms(r['get p50'][-1])}, list p50 "
                        f"{run.ms(r['list-20 p50'][-1])}, wrk {w['rps']:.0f} req/s p99 {run.ms(w['p99'])} "
                        f"errors {w['errors']}, server CPU {cpu * 1e6:.0f} us/request (load {run.load()})")
            finally:
                server.stop()
    for name, r in results.items():
        print(f"{name}: get p50 {run.ms(run.median(r['get p50']))}, "
              f"list-20 p50 {run.ms(run.median(r['list-20 p50']))}, "
              f"wrk {run.median(r['wrk rps']):.0f} req/s, p50 {run.ms(run.median(r['wrk p50']))}, "
              f"p99 {run.ms(run.median(r['wrk p99']))}, errors {sum(r['wrk errors']):.0f}, "
              f"server CPU {run.median(r['server cpu per request']) * 1e6:.0f} us/request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
