#!/usr/bin/env python3
"""Benchmark verify of a repository over SSH (every file hashed again on the server) against a plain sha256sum there.

Starts a real sshd on 127.0.0.1 (tests/sshserver.py), builds the same
deterministic source tree as bench_incremental.py, backs it up once with
backup-agent into ``127.0.0.1:DEST`` (the first backup hashes every file on
the server for its manifest), then times ``--rounds`` rounds of, interleaved:

- floor: ``ssh ... 127.0.0.1 'cd SNAPSHOT && find . -type f -exec sha256sum {} +'``,
  one connection, every regular file hashed once on the server, the output
  thrown away: the least reading a snapshot back on the server can cost;
- backup-agent: ``PYTHON -m agent.cli verify --config CFG --remote bench``
  (the same snapshot, checked against its manifest: the server lists it,
  hashes each distinct inode, the client compares).

It prints the medians, the ratio (target: verify within 1.5x the floor)
and, from the snapshot's metadata, what writing the manifest cost the first
backup (all files hashed on the server) against that backup's duration.
Needs root (the test sshd logs in as root), openssh-server and rsync. Exit
status 0 when everything ran and verify found the snapshot intact, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_DIR = BENCH_DIR.parent
sys.path[:0] = [str(BENCH_DIR), str(PROJECT_DIR)]

from bench_incremental import BenchError, build_source, run_timed  # noqa: E402
from bench_remote import ssh_options  # noqa: E402
from tests.sshserver import SshServer, running_sshd  # noqa: E402

RATIO_TARGET = 1.5
AGENT_CONFIG = '[backup]\nionice = "none"\nnice = 0\n[rotation]\nhourly = "always"\n'


def measure(args: argparse.Namespace, server: SshServer, src: Path, runs: Path, files: int, reused: bool) -> int:
    logs = runs / "logs"
    logs.mkdir()
    env = {**os.environ, "BACKUP_AGENT_RUNTIME_DIR": str(runs / "runtime"), "PYTHONPATH": str(PROJECT_DIR)}
    (runs / "runtime").mkdir()
    (runs / "state").mkdir()
    dest = runs / "repo"
    config = runs / "agent.toml"
    config.write_text(AGENT_CONFIG + f'[system]\nstate_dir = "{runs / "state"}"\n' + server.config(str(dest), name="bench"))
    agent = [str(args.python), "-m", "agent.cli"]
    first = run_timed([*agent, "backup", "--no-sudo", "-q", "--config", str(config), str(src), f"127.0.0.1:{dest}"], logs / "backup", env=env)
    (snapshot,) = [p for p in (dest / "snapshots").iterdir()]
    manifest = json.loads((dest / "metadata" / f"{snapshot.name}.json").read_text())["manifest"]
    if "error" in manifest:
        raise BenchError(f"the backup wrote no manifest: {manifest['error']}")
    floor_argv = [*ssh_options(server), "127.0.0.1", f"cd '{snapshot}' && find . -type f -exec sha256sum {{}} +"]
    verify_argv = [*agent, "verify", "--config", str(config), "--remote", "bench"]
    times: dict[str, list[float]] = {"floor": [], "verify": []}
    for round_ in range(args.rounds):
        order = ["floor", "verify"] if round_ % 2 == 0 else ["verify", "floor"]
        for key in order:
            os.sync()
            argv = floor_argv if key == "floor" else verify_argv
            times[key].append(run_timed(argv, logs / f"{key}-{round_}", env=env))
    last = subprocess.run(verify_argv, env=env, capture_output=True, text=True)
    if last.returncode != 0 or not last.stdout.startswith("intact:"):
        raise BenchError(f"verify did not find the snapshot intact: {last.stdout.strip()} {last.stderr.strip()}")
    medians = {key: statistics.median(values) for key, values in times.items()}
    ratio = medians["verify"] / medians["floor"]
    print(f"verify over ssh on loopback: {files} files, {manifest['hashed_bytes'] / (1 << 20):.1f} MiB, {args.rounds} rounds"
          f"{' (source tree reused)' if reused else ''}")  # fmt: skip
    print(f"{'what':<10} {'median s':>9} {'min s':>7} {'x floor':>8}")
    for key in times:
        print(f"{key:<10} {medians[key]:>9.2f} {min(times[key]):>7.2f} {medians[key] / medians['floor']:>8.3f}")
    print(f"target: verify within {RATIO_TARGET:.2f}x a plain sha256sum on the server: {ratio:.3f}x, {'met' if ratio <= RATIO_TARGET else 'MISSED'}")
    print(f"first backup: {first:.2f} s, of which the manifest {manifest['duration']:.2f} s "
          f"({manifest['hashed_files']} files hashed on the server)")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"files": files, "rounds": args.rounds, "times": times, "ratio": ratio,
                                         "target": RATIO_TARGET, "first_backup": first, "manifest": manifest}, indent=2))  # fmt: skip
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=50_000)
    parser.add_argument("--big-files", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=20261122)
    parser.add_argument("--workdir", type=Path, help="cache for the source tree (reused between runs)")
    parser.add_argument("--python", type=Path, default=PROJECT_DIR / ".venv" / "bin" / "python")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_remote_verify.py needs root: the test sshd logs in as root", file=sys.stderr)
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-remote-verify-", dir="/var/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    tree, reused = build_source(workdir, args.files, args.big_files, args.seed)
    runs = Path(tempfile.mkdtemp(prefix="runs-", dir=workdir))
    started = time.monotonic()
    try:
        with running_sshd(runs / "sshd") as server:
            return measure(args, server, tree.path, runs, tree.files, reused)
    except BenchError as exc:
        print(f"a step failed: {exc}\nthe run is kept in {runs}", file=sys.stderr)
        (runs / "failed").touch()
        return 1
    finally:
        print(f"(whole run {time.monotonic() - started:.0f} s)")
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
        elif runs.exists() and not (runs / "failed").exists():
            shutil.rmtree(runs, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
