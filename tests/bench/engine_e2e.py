#!/usr/bin/env python3
"""The asynchronous path end to end, one binary beside another in one run:
put → engine → demo model (no delay) → sink on a single node, measured by
`eddy bench --e2e` with 16 producers and an engine of concurrency 16.

    tests/bench/engine_e2e.py --base /path/to/older/eddy
    tests/bench/engine_e2e.py --base OLD --eddy-bin NEW --rounds 3 -n 10000
    tests/bench/engine_e2e.py --base OLD --prefetch 16   # this binary's engine prefetches

Each round runs every binary in turn (its own node, demo model and engine,
on a fresh data directory), so both see the same machine; the same client
(`--eddy-bin`'s `eddy bench`) drives both. Prints requests/s per round,
the medians and their ratio. A benchmark, not a test: it prints figures.
"""

import argparse
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NODE, RAFT, MODEL = 18080, 19090, 18000


def wait_ready(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} not ready after {timeout} s")


def check_ports_free() -> None:
    """A process left on one of the ports would be measured instead of the
    run's own (its node answers /readyz while the new one fails to bind)."""
    for port in (NODE, RAFT, MODEL):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                raise SystemExit(f"127.0.0.1:{port} is taken by another process; stop it first")


def one_run(server_bin: str, client_bin: str, args, engine_extra: list[str]) -> tuple[float, str]:
    """Requests/s of one run of `server_bin`, and the bench's line."""
    check_ports_free()
    with tempfile.TemporaryDirectory(prefix="eddy-e2e-") as data:
        procs = []
        try:
            procs.append(subprocess.Popen(
                [server_bin, "serve", "--data-dir", data, "--listen", f"127.0.0.1:{NODE}",
                 "--raft-listen", f"127.0.0.1:{RAFT}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_ready(f"http://127.0.0.1:{NODE}/readyz")
            procs.append(subprocess.Popen(
                [server_bin, "demo-model", "--listen", f"127.0.0.1:{MODEL}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            procs.append(subprocess.Popen(
                [server_bin, "engine", "-e", f"127.0.0.1:{NODE}", "--service", "demo",
                 "--model", f"http://127.0.0.1:{MODEL}",
                 "--concurrency", str(args.concurrency), *engine_extra],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            if any(p.poll() is not None for p in procs):
                raise SystemExit(f"{server_bin}: a process of the run exited at start")
            out = subprocess.run(
                [client_bin, "bench", "-e", f"127.0.0.1:{NODE}", "demo", "--e2e",
                 "-p", str(args.producers), "-n", str(args.count), "-s", "256"],
                check=True, capture_output=True, text=True, timeout=600).stdout
        finally:
            for p in reversed(procs):
                p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
    line = next(l for l in out.splitlines() if "requests/s" in l)
    rate = float(re.search(r"([0-9.]+) requests/s", line).group(1))
    return rate, line


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="the binary to compare against")
    ap.add_argument("--eddy-bin", default=str(REPO / "target/release/eddy"))
    ap.add_argument("-p", "--producers", type=int, default=16)
    ap.add_argument("-n", "--count", type=int, default=5000)
    ap.add_argument("--concurrency", type=int, default=16, help="the engine's window")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prefetch", type=int, default=0,
                    help="the engine prefetch of --eddy-bin's run (the base runs without)")
    args = ap.parse_args()
    binaries = {"base": args.base, "this": args.eddy_bin}
    rates = {name: [] for name in binaries}
    for r in range(1, args.rounds + 1):
        for name, binary in binaries.items():
            extra = ["--prefetch", str(args.prefetch)] if name == "this" and args.prefetch else []
            rate, line = one_run(binary, args.eddy_bin, args, extra)
            rates[name].append(rate)
            print(f"round {r} {name:>4}: {line}", flush=True)
    base, this = (statistics.median(rates[n]) for n in ("base", "this"))
    print(f"\nmedian requests/s over {args.rounds} rounds, {args.producers} producers, "
          f"engine concurrency {args.concurrency} (prefetch {args.prefetch} for this), {args.count} requests per run:")
    print(f"  base {base:,.0f}   this {this:,.0f}   this/base {this / base:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
