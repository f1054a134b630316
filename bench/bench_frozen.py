#!/usr/bin/env python3
"""What freezing a btrfs source costs: a no-change incremental of one subvolume, frozen and live.

Builds the benchmark tree of bench_incremental.py (same planner, same seed)
inside a btrfs subvolume on a loop-mounted image, makes a first snapshot of
it into two repositories (one for each way), then times, in interleaved
rounds, ``backup-agent backup -b -s`` of the subvolume with ``freeze =
"auto"`` (a read-only btrfs snapshot, read in a private mount namespace,
deleted after) and with ``freeze = "never"`` (read live), and the bare
``rsync -aHAX --link-dest`` floor of the live tree. Prints the medians, the
ratio frozen/live and the target. Needs root and btrfs-progs.

    sudo python3 bench/bench_frozen.py --files 2000 --rounds 3      # quick
    sudo python3 bench/bench_frozen.py --files 50000 --rounds 5     # full
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_incremental import build_source, run_timed  # noqa: E402

PROJECT = Path(__file__).resolve().parent.parent
#: Freezing adds a fixed cost (two btrfs commands, the namespace helper's start) and reads the tree through
#: a new subvolume; on a no-change incremental it should stay within this of reading it live.
TARGET_RATIO = 1.20


@contextlib.contextmanager
def btrfs_mount(workdir: Path, size_mib: int) -> Iterator[Path]:
    image, mount = workdir / "btrfs.img", workdir / "btrfs"
    with open(image, "wb") as handle:
        handle.truncate(size_mib * 1024 * 1024)
    subprocess.run(["mkfs.btrfs", "-q", "-f", str(image)], check=True, capture_output=True)
    mount.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)
        image.unlink()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=50_000)
    parser.add_argument("--big-files", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--python", default=str(PROJECT / ".venv" / "bin" / "python"))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_frozen: needs root (loop mounts, btrfs snapshots, mount namespaces)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-frozen-", dir="/var/tmp") as tmp:
        workdir = Path(tmp)
        size = max(400, args.files * 24 // 1000 + 40 * args.big_files)
        with btrfs_mount(workdir, size) as mount:
            subvolume = mount / "sv"
            subprocess.run(["btrfs", "subvolume", "create", str(subvolume)], check=True, capture_output=True)
            built = time.perf_counter()
            tree, _reused = build_source(subvolume, args.files, args.big_files, args.seed)
            print(f"tree: {tree.files} files, {tree.total_bytes / 2**20:.0f} MiB, built in {time.perf_counter() - built:.1f} s")
            env = {**os.environ, "PYTHONPATH": str(PROJECT), "BACKUP_AGENT_RUNTIME_DIR": str(workdir)}
            configs = {}
            for way in ("auto", "never"):
                config = workdir / f"{way}.toml"
                config.write_text(f'[backup]\nionice = "none"\nnice = 0\nfreeze = "{way}"\n')
                configs[way] = config
            repos = {way: workdir / f"repo-{way}" for way in configs}
            floor_dir = workdir / "floor"
            floor_dir.mkdir()
            logs = workdir / "logs"
            logs.mkdir()

            def agent(way: str, tag: str) -> float:
                argv = [args.python, "-m", "agent.cli", "backup", "--no-sudo", "-q", "-b", "-s",
                        "--config", str(configs[way]), str(subvolume), str(repos[way])]
                return run_timed(argv, logs / f"{way}-{tag}", cwd=PROJECT, env=env)

            def floor(tag: str) -> float:
                previous = sorted(floor_dir.iterdir())
                target = floor_dir / f"{len(previous):03d}"
                link = [f"--link-dest={previous[-1]}"] if previous else []
                return run_timed(["rsync", "-aHAX", "--numeric-ids", *link, f"{subvolume}/", f"{target}/"],
                                 logs / f"floor-{tag}")

            for way in configs:
                agent(way, "first")
            floor("first")
            times: dict[str, list[float]] = {"frozen": [], "live": [], "floor": []}
            for number in range(args.rounds):
                times["frozen"].append(agent("auto", f"r{number}"))
                times["live"].append(agent("never", f"r{number}"))
                times["floor"].append(floor(f"r{number}"))
            frozen_meta = json.loads(sorted((repos["auto"] / "metadata").glob("*.json"))[-1].read_text())
            if frozen_meta.get("frozen") is not True:
                print("bench_frozen: the frozen run did not freeze the subvolume", file=sys.stderr)
                return 1
            leftovers = [p.name for p in subvolume.iterdir() if p.name.startswith(".backup-agent-frozen.")]
    medians = {key: statistics.median(values) for key, values in times.items()}
    ratio = medians["frozen"] / medians["live"]
    print(f"rounds: {args.rounds}, medians (s): frozen {medians['frozen']:.3f}, live {medians['live']:.3f}, "
          f"rsync floor {medians['floor']:.3f}")
    print(f"frozen / live: {ratio:.3f}x (target <= {TARGET_RATIO:.2f}x): {'met' if ratio <= TARGET_RATIO else 'MISSED'}")
    print(f"frozen / floor: {medians['frozen'] / medians['floor']:.3f}x, live / floor: {medians['live'] / medians['floor']:.3f}x")
    print(f"snapshots left behind: {len(leftovers)}")
    if args.json:
        args.json.write_text(json.dumps({"files": tree.files, "times": times, "medians": medians, "ratio": ratio,
                                         "target": TARGET_RATIO, "leftovers": leftovers}, indent=2))
    return 0 if ratio <= TARGET_RATIO and not leftovers else 1


if __name__ == "__main__":
    sys.exit(main())
