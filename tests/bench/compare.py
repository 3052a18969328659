#!/usr/bin/env python3
"""Eddy beside its peers: run the shared work-queue harness on Eddy, NATS
JetStream R3 and RabbitMQ quorum queues in one run, and print Eddy's
figures as ratios to theirs, next to the disk's floor (one 4 KiB
`dd oflag=dsync` write) measured in the same run.

    tests/bench/compare.py                      # P=4: eddy-3 nats-r3 rabbit-q3
    tests/bench/compare.py --producers 64 --systems "eddy-3 nats-r3"

The harness (`peers/`: qbench and start scripts) is copied from --peers
(default ../shared/peers, or $EDDY_PEERS_DIR) into target/peers, where
qbench is built once. NATS and RabbitMQ come from Debian's packages
(`apt-get install nats-server rabbitmq-server`); a system whose server is
missing is left out. Eddy runs from --eddy-bin (default
target/dist/eddy, from `cargo build --profile dist`, else
target/release/eddy). A benchmark, not a test: it prints figures.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NAMES = {
    "eddy-3": "Eddy 3-node",
    "nats-r3": "NATS JetStream 3-node R3",
    "rabbit-q3": "RabbitMQ 3-node quorum",
}
SERVERS = {"nats-r3": "nats-server", "rabbit-q3": "rabbitmq-server"}


def dsync_floor_ms(directory: Path, writes: int = 500) -> float:
    """Mean time of one synchronous 4 KiB write in `directory`, in ms."""
    target = directory / "dsync-probe"
    started = time.monotonic()
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={target}", "bs=4k", f"count={writes}", "oflag=dsync"],
        check=True,
        capture_output=True,
    )
    took = time.monotonic() - started
    target.unlink(missing_ok=True)
    return took * 1000 / writes


def prepare_harness(peers: Path) -> Path:
    work = REPO / "target" / "peers"
    work.mkdir(parents=True, exist_ok=True)
    for item in peers.iterdir():
        if item.name in ("results", ".run"):
            continue
        dest = work / item.name
        if item.is_dir():
            shutil.copytree(item, dest, dirs_exist_ok=True)
        else:
            shutil.copy2(item, dest)
    (work / "results").mkdir(exist_ok=True)
    qbench = work / "qbench"
    if not (qbench / "target" / "release" / "qbench").exists():
        print("building qbench (once) ...", file=sys.stderr)
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=qbench, check=True)
    return work


def parse_results(text: str):
    """Rows of the harness's table: {(system, size, window): {column: value}}."""
    rows = {}
    header = None
    for line in text.splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == "system":
            header = cells
            continue
        if header is None or set(cells[0]) <= {"-", ":"}:
            continue
        row = dict(zip(header, cells))
        rows[(row["system"], row["S"], row["W"])] = row
    return rows


def first_number(cell: str) -> float:
    """The first figure of a cell, in ms when the cell carries a unit."""
    m = re.match(r"([\d.]+)\s*(ms|s|us|µs)?", cell.strip().replace(",", ""))
    if not m:
        return float("nan")
    scale = {"s": 1000.0, "us": 0.001, "µs": 0.001}.get(m.group(2) or "", 1.0)
    return float(m.group(1)) * scale


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", default=os.environ.get("EDDY_PEERS_DIR",
                                                      str(REPO.parent / "shared" / "peers")))
    # The dist profile's binary is what ships (link-time optimisation);
    # the release profile's is the fallback.
    shipped = REPO / "target" / "dist" / "eddy"
    ap.add_argument("--eddy-bin", default=str(shipped if shipped.exists()
                                              else REPO / "target" / "release" / "eddy"))
    ap.add_argument("--systems", default="eddy-3 nats-r3 rabbit-q3")
    ap.add_argument("--producers", "-p", type=int, default=4)
    ap.add_argument("-n", type=int, default=30000, help="256 B messages per phase")
    ap.add_argument("--big-n", type=int, default=3000, help="64 KiB messages per phase")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    eddy_bin = Path(args.eddy_bin)
    release = REPO / "target" / "release" / "eddy"
    if (eddy_bin == shipped and release.exists() and eddy_bin.exists()
            and release.stat().st_mtime > eddy_bin.stat().st_mtime):
        print(f"{eddy_bin} is older than {release}: rebuild it "
              "(cargo build --profile dist) or pass --eddy-bin", file=sys.stderr)
        return 2
    if eddy_bin.exists():
        built = time.strftime("%Y-%m-%d %H:%M", time.localtime(eddy_bin.stat().st_mtime))
        print(f"eddy: {eddy_bin.resolve()} (built {built})", file=sys.stderr)

    peers = Path(args.peers)
    if not (peers / "run-all.sh").exists():
        print(f"no harness at {peers} (set --peers or EDDY_PEERS_DIR)", file=sys.stderr)
        return 2
    systems = []
    for s in args.systems.split():
        server = SERVERS.get(s)
        if server and shutil.which(server) is None:
            print(f"leaving out {s}: {server} is not installed", file=sys.stderr)
            continue
        systems.append(s)
    work = prepare_harness(peers)
    floor = dsync_floor_ms(work)
    env = dict(os.environ)
    env.update({
        "EDDY_BIN": str(Path(args.eddy_bin).resolve()),
        # Every multi-node Eddy needs an admin token; the harness's Eddy is
        # on loopback and private to this run.
        "EDDY_ADMIN_TOKEN": env.get("EDDY_ADMIN_TOKEN") or os.urandom(16).hex(),
        "SYSTEMS": " ".join(systems),
        "N": str(args.n),
        "BIG_N": str(args.big_n),
        "P": str(args.producers),
        "WINDOWS": "5",
        "REPS": str(args.reps),
    })
    before = set((work / "results").glob("*.md"))
    subprocess.run(["./run-all.sh"], cwd=work, env=env, check=True)
    report = max(set((work / "results").glob("*.md")) - before, key=lambda p: p.stat().st_mtime)
    rows = parse_results(report.read_text())
    floor_after = dsync_floor_ms(work)

    def find(system, size):
        for (name, s, w), row in rows.items():
            if name.startswith(NAMES[system]) and s == size and w == "5":
                return row
        return None

    print(f"\nharness report: {report}")
    print(f"P={args.producers}, C=4, W=5, medians of {args.reps}; disk floor (4 KiB dsync write): "
          f"{floor:.3f} ms before, {floor_after:.3f} ms after\n")
    metrics = [
        ("put/s 256 B", "256B", "put msg/s", True),
        ("cycle/s 256 B", "256B", "cycle msg/s", True),
        ("put/s 64 KiB", "64KiB", "put msg/s", True),
        ("cycle/s 64 KiB", "64KiB", "cycle msg/s", True),
        ("sequential put p50 ms", "256B", "put p50 / p99 ms", False),
        ("e2e p50 during cycle ms", "256B", "e2e p50 / p99 ms (cycle)", False),
        ("e2e p99 during cycle ms", "256B", "e2e p50 / p99 ms (cycle)", False),
    ]
    peers_run = [s for s in systems if s != "eddy-3"]
    head = f"{'scenario':<26}{'Eddy':>12}" + "".join(f"{s:>12}" for s in peers_run) + \
        "".join(f"{'Eddy/' + s:>18}" for s in peers_run)
    print(head)
    for label, size, column, higher_is_better in metrics:
        def value(system):
            row = find(system, size)
            if row is None:
                return float("nan")
            cell = row[column]
            if "p99" in label:
                cell = cell.split("/")[1]
            return first_number(cell)
        eddy = value("eddy-3")
        line = f"{label:<26}{eddy:>12.3f}" + "".join(f"{value(s):>12.3f}" for s in peers_run)
        for s in peers_run:
            other = value(s)
            ratio = eddy / other if other else float("nan")
            line += f"{ratio:>17.2f}{'' if higher_is_better else '*'}"
        print(line)
    eddy_seq = find("eddy-3", "256B")
    if eddy_seq:
        p50 = first_number(eddy_seq["put p50 / p99 ms"])
        print(f"\nsequential put p50 / disk floor: {p50 / floor:.2f}x")
    print("(* a time: lower is better, so a ratio under 1 favours Eddy)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
