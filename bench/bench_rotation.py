#!/usr/bin/env python3
"""Benchmark rotation deleting 20 snapshots: how long until the cycle reports success.

Each round gives backup-agent a repository of one real backup and
``--snapshots`` (default 20) ``cp -al`` copies of it under older names
(hard-linked snapshots, links layout; not timed), then times
one no-change incremental ``backup-agent backup --json`` whose rotation
(``hourly = 1``) deletes all of them (the hour's first snapshot and the new
one are kept). Two codes run, interleaved round by
round on repositories made alike:

- after: this checkout, which takes the old snapshots out of the listing,
  reports ``complete``, then empties ``.trash`` (the ``empty-trash`` step);
- before: the same command from the commit given by ``--before`` (the code
  before that change: ``rm`` inside the ``rotate`` step, before
  ``complete``), unpacked with ``git archive`` into the run's directory.

For each, the time from start until the ``complete`` line arrives on stdout
(what the agent shows as success), until the process exits (the disk is
closed after it), and how long ``rm`` ran (between the step events around it,
as they arrived). The floor is measured in the same round: bare
``rsync -aHAX --numeric-ids --link-dest`` of the source (a no-change
snapshot, no rotation), and bare ``ionice -c3 rm -rf`` of as many ``cp -al``
trees.

Run ``bench_rotation.py --help`` for the options; see bench/README.md.
Exit status: 0 when every run worked, 1 when one failed, 2 on a usage error.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_DIR = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

from bench_incremental import BenchError, build_source  # noqa: E402

CONFIG = """\
[backup]
ionice = "none"
nice = 0

[rotation]
hourly = 1
daily = 0
weekly = 0
monthly = 0
yearly = 0
"""


@dataclass
class Timing:
    """One code's figures over the rounds (seconds)."""

    to_complete: list[float] = field(default_factory=list)
    to_exit: list[float] = field(default_factory=list)
    rm: list[float] = field(default_factory=list)
    deleted: list[int] = field(default_factory=list)


def make_repository(python: Path, code: Path, config: Path, src: Path, repo: Path, snapshots: int) -> None:
    """A repository with one backup of src and ``snapshots`` cp -al copies of it under older names (not timed).

    The backup itself stays (rotation keeps the hour's first snapshot and the newest).
    """
    run_agent(python, code, config, src, repo)
    (first,) = [p for p in (repo / "snapshots").iterdir()]
    for index in range(snapshots):
        name = f"2020-01-{1 + index // 24:02d}T{index % 24:02d}-00-00+0000"
        subprocess.run(["cp", "-al", str(first), str(repo / "snapshots" / name)], check=True)


def run_agent(python: Path, code: Path, config: Path, src: Path, repo: Path) -> tuple[float, float, float, int]:
    """One backup with the code in ``code``: seconds to the complete line, to the exit, of rm; snapshots deleted."""
    env = dict(os.environ, PYTHONPATH=str(code))
    env.pop("SUDO_UID", None)
    argv = [str(python), "-m", "agent.cli", "backup", "--no-sudo", "--json", "--config", str(config), str(src), str(repo)]
    os.sync()  # the writeback of what came before is nobody's cost
    start = time.perf_counter()
    process = subprocess.Popen(argv, cwd=code, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    arrivals: list[tuple[float, dict[str, object]]] = []
    for line in process.stdout or ():
        arrivals.append((time.perf_counter() - start, json.loads(line)))
    stderr = process.stderr.read() if process.stderr is not None else ""
    status = process.wait()
    ended = time.perf_counter() - start
    if status != 0:
        raise BenchError(f"{' '.join(argv)} exited with {status}: {stderr.strip()[-2000:]}")

    def at(event: str, step: str | None = None, state: str | None = None) -> float | None:
        for when, item in arrivals:
            if item["event"] == event and item.get("step") == step and item.get("state") == state:
                return when
        return None

    completed = at("complete")
    if completed is None:
        raise BenchError(f"no complete event from {code}")
    deleted = next(len(item["deleted"]) for _, item in arrivals if item["event"] == "complete")  # type: ignore[arg-type]
    # Where rm ran: the empty-trash step (after), or inside rotate (before).
    begun, done = at("step", "empty-trash", "start"), at("step", "empty-trash", "done")
    if begun is None or done is None:
        begun, done = at("step", "rotate", "start"), at("step", "rotate", "done")
    return completed, ended, (done or 0.0) - (begun or 0.0), deleted


def floor_rsync(src: Path, previous: Path, new: Path) -> float:
    os.sync()
    start = time.perf_counter()
    subprocess.run(["rsync", "-aHAX", "--numeric-ids", f"--link-dest={previous}", f"{src}/", f"{new}/"], check=True)
    return time.perf_counter() - start


def floor_rm(trees: Sequence[Path]) -> float:
    os.sync()
    start = time.perf_counter()
    subprocess.run(["ionice", "-c3", "rm", "-rf", "--one-file-system", "--", *map(str, trees)], check=True)
    return time.perf_counter() - start


def unpack(before: str, into: Path) -> Path:
    """The package as it was at ``before`` (git archive), to run as the old code."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(PROJECT_DIR), "archive", before, "agent"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def run(args: argparse.Namespace, workdir: Path) -> int:
    tree, cached = build_source(workdir, args.files, args.big_files, args.seed)
    print(f"source: {tree.files} files, {tree.total_bytes / 2**20:.0f} MiB ({'cached' if cached else 'built'})")
    runs = workdir / "rotation-runs"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir()
    config = runs / "config.toml"
    config.write_text(CONFIG)
    codes = {"after": PROJECT_DIR, "before": unpack(args.before, runs / "before-code")}
    timings = {name: Timing() for name in codes}
    floor: dict[str, list[float]] = {"rsync": [], "rm": []}
    try:
        for round_ in range(args.rounds):
            order = list(codes) if round_ % 2 == 0 else list(reversed(codes))
            for name in order:
                repo = runs / f"{name}-{round_}"
                make_repository(args.python, codes[name], config, tree.path, repo, args.snapshots)
                time.sleep(1.1)  # the new snapshot gets a name of its own (one-second resolution)
                completed, ended, rm, deleted = run_agent(args.python, codes[name], config, tree.path, repo)
                if deleted != args.snapshots:
                    raise BenchError(f"{name}: rotation deleted {deleted} snapshots, not {args.snapshots}")
                left = os.listdir(repo / ".trash") if (repo / ".trash").exists() else []
                if left:
                    raise BenchError(f"{name}: .trash still holds {left}")
                timing = timings[name]
                timing.to_complete.append(completed)
                timing.to_exit.append(ended)
                timing.rm.append(rm)
                timing.deleted.append(deleted)
                print(f"round {round_ + 1} {name}: complete at {completed:.2f} s, exit at {ended:.2f} s, rm {rm:.2f} s")
                # The floor: a bare no-change snapshot beside it, and bare rm of as many hard-link trees.
                kept = sorted((repo / "snapshots").iterdir())[-1]
                if name == order[-1]:
                    floor["rsync"].append(floor_rsync(tree.path, kept, runs / f"floor-{round_}"))
                    copies = [runs / f"floor-{round_}-{i}" for i in range(args.snapshots)]
                    for copy in copies:
                        subprocess.run(["cp", "-al", str(kept), str(copy)], check=True)
                    floor["rm"].append(floor_rm(copies))
                    shutil.rmtree(runs / f"floor-{round_}")
                shutil.rmtree(repo)
    except (BenchError, subprocess.CalledProcessError) as exc:
        print(f"bench_rotation: {exc}", file=sys.stderr)
        return 1

    rsync_floor, rm_floor = median(floor["rsync"]), median(floor["rm"])
    print()
    print(f"{tree.files} files, {args.snapshots} snapshots deleted, {args.rounds} rounds, medians:")
    print(f"{'':34} {'to complete s':>14} {'x floor':>8} {'to exit s':>10} {'rm s':>7}")
    for name, label in (("before", f"before ({args.before})"), ("after", "after (this checkout)")):
        t = timings[name]
        print(f"{label:34} {median(t.to_complete):14.2f} {median(t.to_complete) / rsync_floor:8.2f} "
              f"{median(t.to_exit):10.2f} {median(t.rm):7.2f}")
    print(f"{'floor: rsync --link-dest':34} {rsync_floor:14.2f} {1.0:8.2f}")
    print(f"{'floor: ionice -c3 rm -rf (the trees)':34} {'':14} {'':8} {'':10} {rm_floor:7.2f}")
    saved = median(timings["before"].to_complete) - median(timings["after"].to_complete)
    print(f"success is reported {saved:.2f} s sooner "
          f"({median(timings['after'].to_complete) / median(timings['before'].to_complete):.2f}x of before)")
    if args.json is not None:
        args.json.write_text(json.dumps({
            "files": tree.files, "snapshots": args.snapshots, "rounds": args.rounds, "before": args.before,
            "timings": {name: t.__dict__ for name, t in timings.items()}, "floor": floor,
        }, indent=2))
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=50_000, help="files in the source tree (default 50000)")
    p.add_argument("--big-files", type=int, default=10, help="of which 4 MiB files (default 10)")
    p.add_argument("--snapshots", type=int, default=20, help="snapshots rotation deletes (default 20)")
    p.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    p.add_argument("--seed", type=int, default=20261122, help="seed of the source tree")
    p.add_argument("--before", default="ac1090c", help="the commit whose agent/ is the old ordering (default ac1090c)")
    p.add_argument("--workdir", type=Path, help="cache for the source tree and place of the runs (default: a temporary "
                   "directory under /var/tmp, removed at the end)")
    p.add_argument("--python", type=Path, default=PROJECT_DIR / ".venv" / "bin" / "python",
                   help="the Python that runs backup-agent (default .venv/bin/python)")
    p.add_argument("--json", type=Path, help="also write the numbers to this file")
    args = p.parse_args(argv)
    if args.snapshots < 2 or args.rounds < 1 or args.files < 1:
        p.error("--snapshots must be at least 2, --rounds and --files at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="bench-rotation-", dir="/var/tmp"))
        try:
            return run(args, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    try:
        return run(args, args.workdir.resolve())
    finally:
        shutil.rmtree(args.workdir / "rotation-runs", ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
