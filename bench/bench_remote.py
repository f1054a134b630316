#!/usr/bin/env python3
"""Benchmark a no-change incremental backup into a repository over SSH on loopback.

Starts a real sshd on 127.0.0.1 (tests/sshserver.py: its own host key, key
and known_hosts, a free port), builds the same deterministic source tree as
bench_incremental.py, makes a first backup with every tool, then times
``--rounds`` rounds of a no-change incremental of each, interleaved, and
prints the medians and the ratios:

- floor: ``rsync -aHAX --numeric-ids -e SSH --link-dest=../PREV SRC/ 127.0.0.1:DEST/snapshots/NEW/``,
  one connection, the least a hard-linked snapshot over ssh can take;
- backup-agent: ``PYTHON -m agent.cli backup --no-sudo -b -s --config CFG SRC 127.0.0.1:DEST``
  (CFG's [[remote]] gives the same key, known_hosts and port);
- rsync-system-backup: its remote mode, ``rsync-system-backup -u --disable-notifications -b -s SRC bench:DEST/latest``
  (rsync into a mirror, then ``cp -al`` on the server through ssh), with an
  ``ssh`` first on its PATH that adds ``-F`` a config naming the same server.

Target: backup-agent within 1.15x the floor. Needs root (sshd logs in as
root), openssh-server, rsync, and rsync-system-backup in a venv (see
bench/README.md). Exit status 0 when every tool ran, 1 when one failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_DIR = BENCH_DIR.parent
sys.path[:0] = [str(BENCH_DIR), str(PROJECT_DIR)]

from bench_incremental import RSB_CANDIDATES, BenchError, build_source, run_timed, wait_for_next_second  # noqa: E402
from tests.sshserver import SshServer, running_sshd  # noqa: E402

RATIO_TARGET = 1.15
AGENT_CONFIG = '[backup]\nionice = "none"\nnice = 0\n[rotation]\nhourly = "always"\n'


def ssh_options(server: SshServer) -> list[str]:
    return [
        "ssh", "-F", "none", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={server.known_hosts}", "-o", "IdentitiesOnly=yes",
        "-i", str(server.identity), "-p", str(server.port),
    ]  # fmt: skip


def count_snapshots(path: Path) -> int:
    return sum(1 for p in path.iterdir() if p.is_dir() and not p.name.endswith(".in-progress")) if path.is_dir() else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=50_000)
    parser.add_argument("--big-files", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=20261122)
    parser.add_argument("--workdir", type=Path, help="cache for the source tree (reused between runs)")
    parser.add_argument("--python", type=Path, default=PROJECT_DIR / ".venv" / "bin" / "python")
    parser.add_argument("--rsb", type=Path, help="rsync-system-backup executable (default: bench/.venv-rsb, .venv-peers)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_remote.py needs root: the test sshd logs in as root", file=sys.stderr)
        return 2
    rsb = args.rsb or next((p for p in RSB_CANDIDATES if p.exists()), None)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-remote-", dir="/var/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    tree, reused = build_source(workdir, args.files, args.big_files, args.seed)
    runs = Path(tempfile.mkdtemp(prefix="runs-", dir=workdir))
    logs = runs / "logs"
    logs.mkdir()
    try:
        with running_sshd(runs / "sshd") as server:
            return measure(args, server, tree.path, runs, logs, rsb, reused, tree.files)
    except BenchError as exc:
        print(f"a tool failed: {exc}\nthe run is kept in {runs}", file=sys.stderr)
        return 1
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
        elif runs.exists() and not (runs / "failed").exists():
            shutil.rmtree(runs, ignore_errors=True)


def measure(args: argparse.Namespace, server: SshServer, src: Path, runs: Path, logs: Path, rsb: Path | None, reused: bool, files: int) -> int:
    ssh = ssh_options(server)
    env = {**os.environ, "BACKUP_AGENT_RUNTIME_DIR": str(runs / "runtime"), "PYTHONPATH": str(PROJECT_DIR)}
    (runs / "runtime").mkdir()
    floor_dest = runs / "floor"
    (floor_dest / "snapshots").mkdir(parents=True)
    agent_dest = runs / "agent"
    config = runs / "agent.toml"
    config.write_text(AGENT_CONFIG + server.config(str(agent_dest)))
    rsb_dest = runs / "rsb"
    rsb_dest.mkdir()
    wrapper_dir = runs / "bin"
    wrapper_dir.mkdir()
    ssh_config = runs / "ssh_config"
    ssh_config.write_text(
        f"Host bench\n  HostName 127.0.0.1\n  Port {server.port}\n  User root\n  IdentityFile {server.identity}\n"
        f"  IdentitiesOnly yes\n  UserKnownHostsFile {server.known_hosts}\n  StrictHostKeyChecking yes\n  BatchMode yes\n"
    )
    (wrapper_dir / "ssh").write_text(f'#!/bin/sh\nexec /usr/bin/ssh -F {ssh_config} "$@"\n')
    (wrapper_dir / "ssh").chmod(0o755)
    (runs / "bench").mkdir()
    calls = {"n": 0}
    last_end = {"t": 0.0}

    def timed(key: str, argv: list[str], run_env: dict[str, str] | None = None) -> float:
        wait_for_next_second(last_end["t"])  # every tool here names snapshots by the second
        os.sync()
        calls["n"] += 1
        elapsed = run_timed(argv, logs / f"{key}-{calls['n']:03d}", env=run_env)
        last_end["t"] = time.time()
        return elapsed

    def floor() -> float:
        done = sorted(p.name for p in (floor_dest / "snapshots").iterdir())
        argv = ["rsync", "-aHAX", "--numeric-ids", "-e", " ".join(ssh)]
        if done:
            argv.append(f"--link-dest=../{done[-1]}")
        new = f"{len(done):04d}"
        return timed("floor", [*argv, f"{src}/", f"127.0.0.1:{floor_dest}/snapshots/{new}/"])

    def agent() -> float:
        return timed("agent", [str(args.python), "-m", "agent.cli", "backup", "--no-sudo", "-q", "-b", "-s",
                               "--config", str(config), str(src), f"127.0.0.1:{agent_dest}"], env)  # fmt: skip

    def peer() -> float:
        if rsb is None:
            raise BenchError("rsync-system-backup is not installed")
        run_env = {**os.environ, "PATH": f"{wrapper_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
        return timed("rsb", [str(rsb), "-u", "--disable-notifications", "-b", "-s", f"{src}", f"bench:{rsb_dest}/latest"], run_env)

    tools: dict[str, Callable[[], float]] = {"floor": floor, "backup-agent": agent}
    if rsb is not None:
        tools["rsync-system-backup"] = peer
    counts = {
        "floor": lambda: count_snapshots(floor_dest / "snapshots"),
        "backup-agent": lambda: count_snapshots(agent_dest / "snapshots"),
        "rsync-system-backup": lambda: sum(1 for p in rsb_dest.iterdir() if p.is_dir() and p.name != "latest"),
    }
    full = {key: tool() for key, tool in tools.items()}
    times: dict[str, list[float]] = {key: [] for key in tools}
    order = list(tools)
    for round_ in range(args.rounds):
        for key in order[round_ % len(order) :] + order[: round_ % len(order)]:
            times[key].append(tools[key]())
    for key in tools:
        if counts[key]() != args.rounds + 1:
            (runs / "failed").touch()
            raise BenchError(f"{key}: {counts[key]()} snapshots after {args.rounds + 1} backups")
    medians = {key: statistics.median(values) for key, values in times.items()}
    floor_median = medians["floor"]
    print(f"no-change incremental over ssh on loopback: {files} files, {args.rounds} rounds"
          f"{' (source tree reused)' if reused else ''}")  # fmt: skip
    print(f"{'tool':<22} {'full s':>8} {'median s':>9} {'min s':>7} {'x floor':>8}")
    for key in tools:
        print(f"{key:<22} {full[key]:>8.2f} {medians[key]:>9.2f} {min(times[key]):>7.2f} {medians[key] / floor_median:>8.3f}")
    ratio = medians["backup-agent"] / floor_median
    verdict = "met" if ratio <= RATIO_TARGET else "MISSED"
    print(f"target: backup-agent within {RATIO_TARGET:.2f}x the floor: {ratio:.3f}x, {verdict}")
    if "rsync-system-backup" in medians:
        print(f"against rsync-system-backup's remote mode: {medians['backup-agent'] / medians['rsync-system-backup']:.3f}x its time")
    else:
        print("rsync-system-backup not found: install it as bench/README.md says to compare with its remote mode")
    if args.json:
        args.json.write_text(json.dumps({"files": files, "rounds": args.rounds, "full": full, "times": times,
                                         "ratio": ratio, "target": RATIO_TARGET}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
