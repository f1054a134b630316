#!/usr/bin/env python3
"""Benchmark the btrfs layout: no-change incrementals, the space of a one-byte change, and btrfs send.

All in one run, on two loop-mounted filesystems made for it (ext4 and
btrfs), with interleaved rounds and medians (bench/README.md,
"bench_btrfs.py"):

- links floor: ``rsync -aHAX --numeric-ids --link-dest=PREV SRC/ NEW/`` on ext4;
- backup-agent, links layout: the whole ``backup`` (rotation included) into a repository on ext4;
- backup-agent, btrfs layout: the whole ``backup`` (rotation included) into a repository on btrfs;
- rsync-system-backup on the same btrfs: mirror + ``cp -al`` (``-b -s``);
- backup-agent, ``method = "send"``: the whole ``backup`` from a source subvolume holding the same tree;
- rsync compare-only: ``rsync -aHAX -x -n`` of that subvolume against the newest snapshot sent (nothing written).

Then the space a one-byte change in the middle of a 64 MiB file costs in
each layout, and with ``--scale`` the same rounds at 500,000 files.
Targets (issue 13): the btrfs layout at most 0.6x the links floor and faster
than rsync-system-backup on the same disk; the new snapshot after a
one-byte change under 1 MiB; send under 0.25x the compare-only rsync (at the
scale size). A missed target is a result (exit 0); a tool that fails or a
snapshot that is incomplete exits 1. Run as root.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from bench_incremental import (  # noqa: E402
    PROJECT_DIR,
    BenchError,
    _median,
    build_source,
    count_files,
    find_rsb,
    run_timed,
    wait_for_next_second,
)

MIB = 1 << 20
TARGET_VS_FLOOR = 0.6
TARGET_SPACE = 1 * MIB
TARGET_SEND = 0.25

CONFIG = '[backup]\nionice = "none"\nnice = 0\n{extra}[rotation]\nhourly = "always"\n'


@contextlib.contextmanager
def loop_filesystem(image: Path, size: int, fstype: str, point: Path) -> Iterator[Path]:
    """A fresh sparse image, made ``fstype`` and loop-mounted on ``point``; unmounted (loop detached) and removed after."""
    with open(image, "wb") as handle:
        handle.truncate(size)
    mkfs = ["mkfs.ext4", "-q", "-F", "-i", "4096", str(image)] if fstype == "ext4" else ["mkfs.btrfs", "-q", "-f", str(image)]
    subprocess.run(mkfs, check=True, capture_output=True)
    point.mkdir(parents=True, exist_ok=True)
    # noatime: the compare-only round reads the source subvolume here, and under relatime that read
    # changes its directories' access times, which the next send must then carry: a change made by
    # the benchmark itself in a "no change" round (the README advises noatime for a sent source).
    subprocess.run(["mount", "-o", "loop,noatime", str(image), str(point)], check=True)
    try:
        yield point
    finally:
        subprocess.run(["umount", str(point)], check=False)
        image.unlink(missing_ok=True)


class Timed:
    """One command timed per round; ``argv()`` gives it, ``check()`` says the snapshot it made is whole."""

    one_second_names = False

    def __init__(self, key: str, logs: Path) -> None:
        self.key = key
        self.logs = logs
        self.times: list[float] = []
        self.full = 0.0
        self._last_end = 0.0
        self._runs = 0

    def argv(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str] | None:
        return None

    def run(self) -> float:
        if self.one_second_names:
            wait_for_next_second(self._last_end)
        os.sync()  # no tool pays for another's writeback (untimed)
        elapsed = run_timed(self.argv(), self.logs / f"{self.key}-{self._runs:03d}", cwd=PROJECT_DIR, env=self.env())
        self._runs += 1
        self._last_end = time.time()
        return elapsed

    def check(self, files: int) -> None:
        """Raise BenchError when the newest snapshot does not hold ``files`` files."""


def newest(snapshots: Path) -> Path:
    found = sorted(p for p in snapshots.iterdir() if p.is_dir() and not p.name.endswith(".in-progress"))
    if not found:
        raise BenchError(f"no snapshot in {snapshots}")
    return found[-1]


class Floor(Timed):
    def __init__(self, logs: Path, source: Path, dest: Path) -> None:
        super().__init__("links-floor", logs)
        self.source, self.dest = source, dest
        dest.mkdir()

    def argv(self) -> list[str]:
        previous = sorted(self.dest.iterdir())
        link = [f"--link-dest={previous[-1]}"] if previous else []
        return ["rsync", "-aHAX", "--numeric-ids", *link, f"{self.source}/", f"{self.dest}/{len(previous):04d}/"]

    def check(self, files: int) -> None:
        if count_files(newest(self.dest)) != files:
            raise BenchError(f"{self.key}: the newest snapshot is incomplete")


class Agent(Timed):
    one_second_names = True

    def __init__(self, key: str, logs: Path, python: Path, source: Path, repo: Path, extra: str = "") -> None:
        super().__init__(key, logs)
        self.python, self.source, self.repo = python, source, repo
        self.config = logs.parent / f"{key}.toml"
        self.config.write_text(CONFIG.format(extra=extra))

    def argv(self) -> list[str]:
        # The whole cycle, rotation and emptying the trash included.
        return [str(self.python), "-m", "agent.cli", "backup", "--no-sudo", "--config", str(self.config), str(self.source), str(self.repo)]

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(PROJECT_DIR)}

    def check(self, files: int) -> None:
        if count_files(newest(self.repo / "snapshots")) != files:
            raise BenchError(f"{self.key}: the newest snapshot is incomplete")


class RsyncSystemBackup(Timed):
    one_second_names = True

    def __init__(self, logs: Path, rsb: Path, source: Path, dest: Path) -> None:
        super().__init__("rsync-system-backup", logs)
        self.rsb, self.source, self.dest = rsb, source, dest
        dest.mkdir()

    def argv(self) -> list[str]:
        return [str(self.rsb), "-u", "--disable-notifications", "-b", "-s", str(self.source), str(self.dest / "latest")]

    def check(self, files: int) -> None:
        snaps = sorted(p for p in self.dest.iterdir() if p.is_dir() and p.name != "latest")
        if not snaps or count_files(snaps[-1]) != files:
            raise BenchError(f"{self.key}: the newest snapshot is incomplete")


class Compare(Timed):
    """rsync's compare alone: the source subvolume against the newest snapshot sent, -n (nothing written)."""

    def __init__(self, logs: Path, source: Path, repo: Path) -> None:
        super().__init__("rsync-compare-only", logs)
        self.source, self.repo = source, repo

    def argv(self) -> list[str]:
        return ["rsync", "-aHAX", "-x", "--numeric-ids", "-n", f"{self.source}/", f"{newest(self.repo / 'snapshots')}/"]


def interleaved(tools: list[Timed], rounds: int, files: int) -> None:
    for tool in tools:
        tool.full = tool.run()
        tool.check(files)
    for index in range(rounds):
        order = tools[index % len(tools):] + tools[: index % len(tools)]
        for tool in order:
            tool.times.append(tool.run())
            tool.check(files)


def make_subvolume_copy(source: Path, target: Path) -> None:
    subprocess.run(["btrfs", "subvolume", "create", str(target)], check=True, capture_output=True)
    subprocess.run(["rsync", "-aHAX", "--numeric-ids", f"{source}/", f"{target}/"], check=True)


def run_set(args: argparse.Namespace, workdir: Path, files: int, rounds: int) -> dict[str, Any]:
    """The timed rounds at one tree size; a dict of medians, ratios and the build time."""
    started = time.perf_counter()
    tree, reused = build_source(workdir, files, args.big_files, args.seed)
    build_seconds = time.perf_counter() - started
    # Sparse images; what counts is what is written. btrfs holds four copies of the tree (the source
    # subvolume, two repositories, rsync-system-backup's mirror), and small files live in its metadata,
    # which is kept twice (DUP): 500,000 files need about 20 GiB there. ext4 holds two copies.
    btrfs_size = max(4 << 30, tree.total_bytes * 6 + files * 40960)
    ext4_size = max(4 << 30, tree.total_bytes * 3 + files * 16384)
    runs = workdir / f"runs-{files}"
    shutil.rmtree(runs, ignore_errors=True)
    logs = runs / "logs"
    logs.mkdir(parents=True)
    with (
        loop_filesystem(runs / "ext4.img", ext4_size, "ext4", runs / "ext4") as ext4,
        loop_filesystem(runs / "btrfs.img", btrfs_size, "btrfs", runs / "btrfs") as btr,
    ):
        subvolume = btr / "source"
        make_subvolume_copy(tree.path, subvolume)
        tools: list[Timed] = [
            Floor(logs, tree.path, ext4 / "floor"),
            Agent("agent-links", logs, args.python, tree.path, ext4 / "agent-links"),
            Agent("agent-btrfs", logs, args.python, tree.path, btr / "agent-btrfs"),
            Agent("agent-send", logs, args.python, subvolume, btr / "agent-send", 'method = "send"\n'),
        ]
        rsb = find_rsb(args.rsb)
        if rsb is not None:
            tools.append(RsyncSystemBackup(logs, rsb, tree.path, btr / "rsb"))
        tools.append(Compare(logs, subvolume, btr / "agent-send"))
        interleaved(tools, rounds, tree.files)
    medians = {tool.key: _median(tool.times) for tool in tools}
    floor = medians["links-floor"]
    result: dict[str, Any] = {
        "files": tree.files,
        "bytes": tree.total_bytes,
        "build_seconds": None if reused else round(build_seconds, 1),
        "rounds": rounds,
        "median_seconds": {k: round(v, 3) for k, v in medians.items()},
        "min_seconds": {tool.key: round(min(tool.times), 3) for tool in tools},
        "full_seconds": {tool.key: round(tool.full, 3) for tool in tools},
        "btrfs_vs_links_floor": round(medians["agent-btrfs"] / floor, 3),
        "links_vs_links_floor": round(medians["agent-links"] / floor, 3),
        "send_vs_compare_only": round(medians["agent-send"] / medians["rsync-compare-only"], 3),
        "btrfs_vs_rsync_system_backup": (
            round(medians["agent-btrfs"] / medians["rsync-system-backup"], 3) if "rsync-system-backup" in medians else None
        ),
    }
    shutil.rmtree(runs, ignore_errors=True)
    return result


def exclusive_bytes(path: Path) -> int:
    """What only this subvolume holds (btrfs filesystem du's Exclusive column), after a filesystem sync."""
    subprocess.run(["btrfs", "filesystem", "sync", str(path)], check=True, capture_output=True)
    out = subprocess.run(["btrfs", "filesystem", "du", "-s", "--raw", str(path)], check=True, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1].split()[1])


def used_bytes(path: Path) -> int:
    os.sync()
    info = os.statvfs(path)
    return (info.f_blocks - info.f_bfree) * info.f_frsize


def space(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """A one-byte change in the middle of a 64 MiB file, backed up in each layout: what the new snapshot costs."""
    runs = workdir / "runs-space"
    shutil.rmtree(runs, ignore_errors=True)
    logs = runs / "logs"
    logs.mkdir(parents=True)
    out: dict[str, Any] = {}
    for fstype in ("btrfs", "ext4"):
        with loop_filesystem(runs / f"{fstype}.img", 1 << 30, fstype, runs / fstype) as point:
            source = runs / f"source-{fstype}"
            source.mkdir()
            big = source / "vm.img"
            big.write_bytes(os.urandom(64 * MIB))
            agent = Agent(f"space-{fstype}", logs, args.python, source, point / "repo")
            agent.run()
            before = used_bytes(point)
            with open(big, "r+b") as handle:
                os.pwrite(handle.fileno(), b"\x01" if os.pread(handle.fileno(), 1, 32 * MIB) != b"\x01" else b"\x02", 32 * MIB)
            os.utime(big, (time.time() + 10, time.time() + 10))
            agent.run()
            grown = used_bytes(point) - before
            snapshot = newest(point / "repo" / "snapshots")
            out[fstype] = {"used_bytes_grown": grown}
            if fstype == "btrfs":
                out[fstype]["exclusive_bytes"] = exclusive_bytes(snapshot)
            shutil.rmtree(source)
    shutil.rmtree(runs, ignore_errors=True)
    return out


def report(sets: list[dict[str, Any]], room: dict[str, Any]) -> None:
    for result in sets:
        print(f"\n{result['files']} files ({result['bytes'] / MIB:.0f} MiB), {result['rounds']} rounds"
              + (f", tree built in {result['build_seconds']} s" if result["build_seconds"] else ", tree reused"))
        print(f"  {'command':<22} {'median s':>9} {'min s':>8} {'full s':>8}")
        for key, value in result["median_seconds"].items():
            print(f"  {key:<22} {value:>9.3f} {result['min_seconds'][key]:>8.3f} {result['full_seconds'][key]:>8.3f}")
        ratio = result["btrfs_vs_links_floor"]
        print(f"  btrfs layout / links floor: {ratio:.3f}x (target <= {TARGET_VS_FLOOR}): {'met' if ratio <= TARGET_VS_FLOOR else 'MISSED'}")
        rsb = result["btrfs_vs_rsync_system_backup"]
        if rsb is None:
            print("  rsync-system-backup: not found (bench/.venv-rsb), not compared")
        else:
            print(f"  btrfs layout / rsync-system-backup on the same btrfs: {rsb:.3f}x (target < 1): {'met' if rsb < 1 else 'MISSED'}")
        send = result["send_vs_compare_only"]
        print(f"  send / rsync -n: {send:.3f}x (target < {TARGET_SEND} at 500,000 files): {'met' if send < TARGET_SEND else 'MISSED'}")
        print(f"  links layout / links floor: {result['links_vs_links_floor']:.3f}x (for the record)")
    if len(sets) == 2:
        small, large = sets
        grow = {k: round(large["median_seconds"][k] / small["median_seconds"][k], 2) for k in small["median_seconds"]}
        print(f"\ngrowth from {small['files']} to {large['files']} files (median ratio): {json.dumps(grow)}")
    exclusive = room["btrfs"]["exclusive_bytes"]
    print(f"\none byte changed in a 64 MiB file: btrfs layout's new snapshot holds {exclusive / 1024:.0f} KiB of its own "
          f"(target < 1 MiB: {'met' if exclusive < TARGET_SPACE else 'MISSED'}); used space grew "
          f"{room['btrfs']['used_bytes_grown'] / 1024:.0f} KiB on btrfs (metadata, manifest included), "
          f"{room['ext4']['used_bytes_grown'] / MIB:.1f} MiB on ext4 (links layout)")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--big-files", type=int, default=10)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--scale", action="store_true", help="also the same rounds at --scale-files (builds that tree once)")
    parser.add_argument("--scale-files", type=int, default=500_000)
    parser.add_argument("--scale-rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/bench-btrfs"), help="trees are kept here for the next run")
    parser.add_argument("--python", type=Path, default=PROJECT_DIR / ".venv" / "bin" / "python")
    parser.add_argument("--rsb", type=Path, default=None, help="rsync-system-backup (default: bench/.venv-rsb)")
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench_btrfs.py makes and mounts loop filesystems: run it as root", file=sys.stderr)
        return 2
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("BACKUP_AGENT_RUNTIME_DIR", str(args.workdir))  # the machine lock: ours, not /run's
    try:
        sets = [run_set(args, args.workdir, args.files, args.rounds)]
        if args.scale:
            sets.append(run_set(args, args.workdir, args.scale_files, args.scale_rounds))
        room = space(args, args.workdir)
    except BenchError as exc:
        print(f"bench_btrfs.py: {exc}", file=sys.stderr)
        return 1
    report(sets, room)
    if args.json is not None:
        args.json.write_text(json.dumps({"sets": sets, "space": room}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
