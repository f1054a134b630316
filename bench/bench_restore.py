#!/usr/bin/env python3
"""Benchmark diff and versions against a full tree walk, in the same run.

Builds bench_incremental.py's source tree (50,000 files by default, cached
under --workdir), makes two snapshots with backup-agent (``backup --no-sudo
-b -s``) with --change-percent of the files rewritten between them, then
times, interleaved round by round (warm caches for all):

- walk: ``os.walk`` + ``os.lstat`` of every entry of both snapshots, the
  least a comparison that does not know about hard links must do;
- diff: ``agent.engine.history.diff`` of the two snapshots (scandir, inodes);
- diff (CLI): ``python -m agent.cli diff --json --repository REPO``, the
  whole command in a new process;
- versions: ``agent.engine.history.versions`` of one file and of one directory.

Prints medians and ratios to the walk. Exit status 0 when everything ran, 1
when diff did not find exactly the changed files.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_DIR = BENCH_DIR.parent
sys.path[:0] = [str(BENCH_DIR), str(PROJECT_DIR)]

from bench_incremental import AGENT_CONFIG, build_source  # noqa: E402

from agent.engine import history  # noqa: E402
from agent.repository.store import Repository  # noqa: E402


def walk(root: str) -> int:
    count = 0
    for directory, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.lstat(os.path.join(directory, name))
            count += 1
    return count


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def backup(python: str, config: Path, source: Path, repo: Path) -> None:
    subprocess.run(
        [python, "-m", "agent.cli", "backup", "--no-sudo", "-q", "-b", "-s", "--config", str(config), str(source), str(repo)],
        cwd=PROJECT_DIR, check=True,
    )


def change_files(source: Path, percent: float, seed: int) -> list[str]:
    """Rewrite ``percent`` of the files (new content, new mtime); their relative paths."""
    files = sorted(str(p.relative_to(source)) for p in source.rglob("*") if p.is_file())
    rng = random.Random(seed)
    chosen = rng.sample(files, max(1, int(len(files) * percent / 100)))
    stamp = time.time() + 10
    for rel in chosen:
        path = source / rel
        path.write_bytes(rng.randbytes(path.stat().st_size + 1))
        os.utime(path, (stamp, stamp))
    return sorted(chosen)


def run(args: argparse.Namespace, workdir: Path) -> int:
    tree, reused = build_source(workdir, args.files, args.big_files, args.seed)
    print(f"source: {tree.files} files in {tree.directories} directories at {tree.path}{' (reused)' if reused else ''}")
    run_dir = Path(tempfile.mkdtemp(prefix="bench-restore-", dir=workdir))
    try:
        source = run_dir / "src"
        subprocess.run(["cp", "-a", "--reflink=auto", str(tree.path), str(source)], check=True)
        config = run_dir / "config.toml"
        config.write_text(AGENT_CONFIG)
        repo = run_dir / "repo"
        backup(args.python, config, source, repo)
        changed = change_files(source, args.change_percent, args.seed)
        backup(args.python, config, source, repo)
        snaps = history.snapshots(Repository.open(str(repo)))
        a, b = snaps[-2].path, snaps[-1].path
        found = sorted(c.path for c in history.diff(a, b))
        if found != changed:
            print(f"diff found {len(found)} changes, expected the {len(changed)} rewritten files")
            return 1
        file_path = os.path.join(str(source), changed[0])
        dir_path = os.path.dirname(file_path)
        cli = [args.python, "-m", "agent.cli", "diff", "--json", "--config", str(config), "--repository", str(repo)]
        actions: dict[str, Callable[[], object]] = {
            "walk": lambda: (walk(a), walk(b)),
            "diff": lambda: history.diff(a, b),
            "diff (CLI)": lambda: subprocess.run(cli, cwd=PROJECT_DIR, check=True, stdout=subprocess.DEVNULL),
            "versions of a file": lambda: history.versions(history.snapshots(Repository.open(str(repo))), file_path),
            "versions of a directory": lambda: history.versions(history.snapshots(Repository.open(str(repo))), dir_path),
        }
        entries = walk(a) + walk(b)
        times: dict[str, list[float]] = {name: [] for name in actions}
        names = list(actions)
        for round_number in range(args.rounds):
            order = names[round_number % len(names):] + names[: round_number % len(names)]
            for name in order:
                times[name].append(timed(actions[name]))
            print(f"round {round_number + 1}/{args.rounds}: " + ", ".join(f"{n} {times[n][-1]:.4f} s" for n in names))
        floor = statistics.median(times["walk"])
        print(
            f"\ntwo snapshots of {tree.files} files ({entries} entries walked), {len(changed)} files changed "
            f"({args.change_percent:g}%), medians of {args.rounds} interleaved rounds:\n"
        )
        print(f"{'what':<26} {'median s':>9} {'min s':>9} {'x walk':>8}")
        for name in names:
            median = statistics.median(times[name])
            print(f"{name:<26} {median:>9.4f} {min(times[name]):>9.4f} {median / floor:>8.3f}")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=50_000)
    parser.add_argument("--big-files", type=int, default=10)
    parser.add_argument("--seed", type=int, default=20261122)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--change-percent", type=float, default=1.0)
    parser.add_argument("--workdir", type=Path, help="keep the source tree here and reuse it (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the run's snapshots")
    parser.add_argument("--python", default=str(PROJECT_DIR / ".venv" / "bin" / "python"))
    args = parser.parse_args(argv)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        return run(args, args.workdir)
    with tempfile.TemporaryDirectory(prefix="bench-restore-", dir="/var/tmp") as name:
        return run(args, Path(name))


if __name__ == "__main__":
    sys.exit(main())
