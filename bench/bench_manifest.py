#!/usr/bin/env python3
"""Benchmark the manifest and verify: what checksums cost a backup, and how fast verify reads.

On bench_incremental.py's tree (its builder, reused), in one run:

1. the manifest's share of a no-change incremental backup (target < 5%) and
   of a backup after 1% of the files changed, over ``--rounds`` rounds each.
   The manifest step times itself (``manifest.duration`` in the snapshot's
   metadata, a monotonic clock around exactly the work a backup without
   manifests would not do); the share is that time over the rest of the
   backup's wall time, both from the same run;
2. ``backup-agent verify`` of the newest snapshot against ``cat`` of the same
   files (``xargs -0 cat > /dev/null``, under the same ``ionice -c3``),
   interleaved: cold (page cache dropped before each, as root) and hot (each
   read once untimed first). Target: verify at 0.8x of cat's throughput or
   better;
3. hashlib's SHA-256, BLAKE2b and BLAKE2s on big (1 MiB blocks) and small
   (4 KiB) buffers in memory, which chose the manifest's hash.

Exit status: 0 when everything ran (even if a target fails), 1 when a step
failed, 2 on a usage error. See bench/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from bench_incremental import (  # noqa: E402  (a sibling script, not a package)
    AGENT_CONFIG,
    MIB,
    PROJECT_DIR,
    BenchError,
    build_source,
    in_workdir,
    run_timed,
    wait_for_next_second,
)

SHARE_TARGET = 0.05
THROUGHPUT_TARGET = 0.8
HASHES = ("sha256", "blake2b", "blake2s")


class Agent:
    """backup-agent as users run it, on a copy of the source that may change."""

    def __init__(self, python: Path, runs: Path, source: Path) -> None:
        self.python = python
        self.runs = runs
        self.source = source
        self.dest = runs / "repo"
        self.config = runs / "backup-agent.toml"
        self.config.write_text(AGENT_CONFIG)
        self.logs = runs / "logs"
        self.logs.mkdir()
        self.env = {**os.environ, "PYTHONPATH": str(PROJECT_DIR)}
        self.env.pop("SUDO_UID", None)
        self._count = 0
        self._last_end = 0.0

    def _log(self, what: str) -> Path:
        self._count += 1
        return self.logs / f"{self._count:03d}-{what}"

    def backup(self) -> tuple[float, dict[str, Any]]:
        """One backup (-b -s: no rotation, as in bench_incremental); wall time and the manifest's metadata."""
        wait_for_next_second(self._last_end)
        os.sync()
        argv = [str(self.python), "-m", "agent.cli", "backup", "--no-sudo", "-b", "-s", "--config", str(self.config),
                str(self.source), str(self.dest)]
        elapsed = run_timed(argv, self._log("backup"), cwd=PROJECT_DIR, env=self.env)
        self._last_end = time.time()
        name = os.readlink(self.dest / "latest").split("/")[-1]
        metadata = json.loads((self.dest / "metadata" / f"{name}.json").read_text())
        manifest = metadata.get("manifest") or {}
        if "duration" not in manifest:
            raise BenchError(f"snapshot {name} has no manifest: {manifest}")
        return elapsed, manifest

    def verify(self) -> tuple[float, int]:
        """verify of the newest snapshot; wall time and bytes it read."""
        log = self._log("verify")
        argv = [str(self.python), "-m", "agent.cli", "verify", "--json", "-q", "--config", str(self.config),
                "--repository", str(self.dest)]
        elapsed = run_timed(argv, log, cwd=PROJECT_DIR, env=self.env)
        report = json.loads(log.with_suffix(".out").read_text())
        if not report["intact"]:
            raise BenchError(f"verify found damage: {report['problems'][:3]}")
        return elapsed, int(report["read"]["bytes"])

    def newest(self) -> Path:
        return self.dest / os.readlink(self.dest / "latest")


def change_files(tree: Path, share: float, rng: random.Random) -> int:
    """Replace ``share`` of the files with new content of the same size (a new inode: the cached tree is untouched)."""
    files = sorted(p for p in tree.rglob("*") if p.is_file())
    chosen = rng.sample(files, max(1, round(len(files) * share)))
    for path in chosen:
        size = path.stat().st_size
        path.unlink()
        path.write_bytes(rng.randbytes(size))
    return len(chosen)


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as handle:
        handle.write("3\n")


def cat_files(snapshot: Path, listing: Path, log: Path) -> tuple[float, int]:
    """``xargs -0 cat`` of every regular file of the snapshot into /dev/null, at idle I/O priority like verify."""
    total = 0
    with open(listing, "wb") as out:
        for directory, _dirs, files in os.walk(snapshot):
            for name in files:
                path = os.path.join(directory, name)
                total += os.lstat(path).st_size
                out.write(os.fsencode(path) + b"\0")
    argv = ["ionice", "-c3", "xargs", "-0", "-a", str(listing), "cat"]
    with open(log.with_suffix(".err"), "wb") as err:
        start = time.perf_counter()
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(argv)} exited with {proc.returncode}")
    return elapsed, total


def hash_rates(big_mib: int = 256, small_count: int = 20000) -> dict[str, dict[str, float]]:
    """MiB/s of each hash on big buffers (1 MiB updates, as hash_file reads) and on 4 KiB ones."""
    rng = random.Random(1)
    block = rng.randbytes(1 << 20)
    small = [rng.randbytes(4096) for _ in range(small_count)]
    rates: dict[str, dict[str, float]] = {}
    for name in HASHES:
        best_big = best_small = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            digest = hashlib.new(name)
            for _ in range(big_mib):
                digest.update(block)
            digest.hexdigest()
            best_big = min(best_big, time.perf_counter() - start)
            start = time.perf_counter()
            for buffer in small:
                hashlib.new(name, buffer).hexdigest()
            best_small = min(best_small, time.perf_counter() - start)
        rates[name] = {"big_mib_s": big_mib / best_big, "small_mib_s": small_count * 4096 / MIB / best_small}
    return rates


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def backup_rounds(agent: Agent, rounds: int, share: float | None, rng: random.Random) -> list[dict[str, float]]:
    rows = []
    for _ in range(rounds):
        changed = change_files(agent.source, share, rng) if share else 0
        wall, manifest = agent.backup()
        rest = wall - manifest["duration"]
        rows.append({"wall": wall, "manifest": manifest["duration"], "share": manifest["duration"] / rest,
                     "changed": changed, "hashed_files": manifest["hashed_files"],
                     "hashed_bytes": manifest["hashed_bytes"]})
    return rows


def run(args: argparse.Namespace, workdir: Path) -> int:
    tree, cached = build_source(workdir, args.files, args.big_files, args.seed)
    print(f"source: {tree.files} files ({tree.big_files} of 4 MiB), {tree.total_bytes / MIB:.1f} MiB, at {tree.path}"
          f"{' (cached)' if cached else ''}")
    flags = cpu_flags()
    print(f"cpu: {os.cpu_count()} cores, sha_ni {'yes' if 'sha_ni' in flags else 'no'}, "
          f"avx2 {'yes' if 'avx2' in flags else 'no'}; {sys.version.split()[0]}")
    runs = workdir / "runs-manifest"
    if runs.exists():
        shutil.rmtree(runs)
    runs.mkdir()
    source = runs / "src"
    subprocess.run(["cp", "-al", str(tree.path), str(source)], check=True)  # links: changes never reach the cache
    agent = Agent(args.python, runs, source)
    rng = random.Random(args.seed + 7)
    results: dict[str, Any] = {"files": tree.files, "bytes": tree.total_bytes}
    try:
        wall, manifest = agent.backup()
        print(f"first full backup: {wall:.2f} s, of which manifest {manifest['duration']:.2f} s "
              f"({manifest['hashed_files']} files, {manifest['hashed_bytes'] / MIB:.1f} MiB hashed)")
        results["full"] = {"wall": wall, "manifest": manifest["duration"]}
        for key, share in (("no_change", None), ("one_percent", 0.01)):
            rows = backup_rounds(agent, args.rounds, share, rng)
            for index, row in enumerate(rows):
                print(f"{key} round {index + 1}/{args.rounds}: backup {row['wall']:.3f} s, manifest {row['manifest']:.3f} s "
                      f"({row['share'] * 100:.2f}%), {row['hashed_files']} files hashed", flush=True)
            results[key] = rows

        verify_rows: dict[str, list[dict[str, float]]] = {"cold": [], "hot": []}
        modes = ["hot"] + (["cold"] if os.geteuid() == 0 else [])
        if "cold" not in modes:
            print("not root: the cold comparison (drop_caches) is skipped")
        newest = agent.newest()
        listing = runs / "files.list"
        for mode in modes:
            for index in range(args.verify_rounds):
                order = ("verify", "cat") if index % 2 == 0 else ("cat", "verify")
                row = {}
                for what in order:
                    if mode == "cold":
                        drop_caches()
                    else:
                        agent.verify() if what == "verify" else cat_files(newest, listing, runs / "logs" / "cat")
                    seconds, read = agent.verify() if what == "verify" else cat_files(newest, listing, runs / "logs" / "cat")
                    row[what] = seconds
                    row[f"{what}_mib_s"] = read / MIB / seconds
                row["ratio"] = row["verify_mib_s"] / row["cat_mib_s"]
                verify_rows[mode].append(row)
                print(f"{mode} round {index + 1}/{args.verify_rounds}: verify {row['verify']:.2f} s "
                      f"({row['verify_mib_s']:.0f} MiB/s), cat {row['cat']:.2f} s ({row['cat_mib_s']:.0f} MiB/s), "
                      f"ratio {row['ratio']:.2f}", flush=True)
        results["verify"] = verify_rows
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        print(f"logs: {runs / 'logs'}", file=sys.stderr)
        return 1
    results["hashes"] = hash_rates()
    report(results, args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    med = statistics.median
    print(f"\nmanifest, {args.rounds} rounds each, {results['files']} files, {results['bytes'] / MIB:.0f} MiB:\n")
    head = f"{'backup':<26} {'median s':>9} {'manifest s':>11} {'share':>7} {'hashed files':>13} {'hashed MiB':>11}"
    print(head)
    print("-" * len(head))
    for key, label in (("no_change", "no change"), ("one_percent", "1% of files changed")):
        rows = results[key]
        print(f"{label:<26} {med(r['wall'] for r in rows):>9.3f} {med(r['manifest'] for r in rows):>11.3f} "
              f"{med(r['share'] for r in rows) * 100:>6.2f}% {med(r['hashed_files'] for r in rows):>13.0f} "
              f"{med(r['hashed_bytes'] for r in rows) / MIB:>11.1f}")
    print(f"\nverify against cat, same files, {args.verify_rounds} interleaved rounds each:\n")
    head = f"{'cache':<6} {'verify MiB/s':>13} {'cat MiB/s':>10} {'ratio':>6}"
    print(head)
    print("-" * len(head))
    for mode, rows in results["verify"].items():
        if rows:
            print(f"{mode:<6} {med(r['verify_mib_s'] for r in rows):>13.0f} {med(r['cat_mib_s'] for r in rows):>10.0f} "
                  f"{med(r['ratio'] for r in rows):>6.2f}")
    print("\nhashlib, in memory (best of 3):\n")
    head = f"{'hash':<8} {'1 MiB blocks MiB/s':>19} {'4 KiB buffers MiB/s':>20}"
    print(head)
    print("-" * len(head))
    for name, rate in results["hashes"].items():
        print(f"{name:<8} {rate['big_mib_s']:>19.0f} {rate['small_mib_s']:>20.0f}")
    print()
    share = med(r["share"] for r in results["no_change"])
    print(f"{'PASS' if share < SHARE_TARGET else 'FAIL'}  manifest adds under 5% to a no-change backup  ({share * 100:.2f}%)")
    for mode, rows in results["verify"].items():
        if rows:
            ratio = med(r["ratio"] for r in rows)
            print(f"{'PASS' if ratio >= THROUGHPUT_TARGET else 'FAIL'}  verify at 0.8x of cat or better, {mode} cache  "
                  f"({ratio:.2f}x)")
    fastest = max(results["hashes"], key=lambda n: results["hashes"][n]["big_mib_s"])
    print(f"{'PASS' if fastest == 'sha256' else 'FAIL'}  the manifest's hash (sha256) is the fastest here  (fastest: {fastest})")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=50_000, help="files in the source tree (default 50000)")
    p.add_argument("--big-files", type=int, default=10, help="of which 4 MiB files (default 10)")
    p.add_argument("--rounds", type=int, default=5, help="backups per case (default 5)")
    p.add_argument("--verify-rounds", type=int, default=3, help="verify/cat pairs per cache mode (default 3)")
    p.add_argument("--seed", type=int, default=20261122, help="seed of sizes, layout and content")
    p.add_argument("--workdir", type=Path, help="cache for the source tree (shared with bench_incremental.py) "
                   "and place of the run (default: a fresh temp dir under /var/tmp, removed at the end unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep the snapshots and logs of this run")
    p.add_argument("--python", type=Path, default=PROJECT_DIR / ".venv" / "bin" / "python",
                   help="interpreter that runs backup-agent (default: the project's .venv)")
    p.add_argument("--json", type=Path, help="also write the numbers to this file")
    args = p.parse_args(argv)
    if args.files < 1 or args.rounds < 1 or args.verify_rounds < 1 or args.big_files < 0:
        p.error("--files, --rounds and --verify-rounds must be positive, --big-files not negative")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return in_workdir(parse_args(argv), run, prefix="bench-manifest-", runs="runs-manifest")

if __name__ == "__main__":
    sys.exit(main())
