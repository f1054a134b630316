#!/usr/bin/env python3
"""Benchmark a no-change incremental backup: backup-agent against the floor and peers.

Builds (once, cached) a deterministic source tree, makes a first full backup
with every tool, then times ``--rounds`` rounds of a no-change incremental
backup of each, interleaved round by round so that machine noise hits all
tools alike. Reports median and min per tool (wall time, and the CPU time,
user + system, of the command's whole process tree), the ratio to the floor
(bare ``rsync --link-dest``), backup-agent's own peak memory, and the targets.

Tools:

- floor: ``rsync -aHAX --numeric-ids --link-dest=PREV SRC/ NEW/``, PREV and NEW in
  DEST/snapshots/, as deep as backup-agent's (rsync's cost per file grows
  with the depth of the --link-dest path: see the Floor class)
- backup-agent: ``PYTHON -m agent.cli backup --no-sudo --config CFG SRC DEST``:
  the whole backup, its rotation step included. Each of its backups runs
  with ``TZ`` one hour further east than the one before, so its snapshot is
  named as the next hour's backup would be, and the scheme
  (``hourly = "always"``) keeps every one: the rotation step reads and plans
  over every snapshot and deletes nothing (removing a snapshot is work the
  floor does not do; bench_rotation.py measures it).
- backup-agent-before (only when asked for in --tools): the same command
  with the package as it was at ``--before`` (``git archive``), to compare
  two versions round by round
- backup-agent (rss): the same, in-process through ``bench/_peak_rss.py``,
  which reports the Python process's VmHWM (rsync not included)
- rsnapshot: ``rsnapshot sync`` + ``rsnapshot hourly`` (sync_first, cp -al)
- rsync-system-backup: ``rsync-system-backup -u --disable-notifications -b -s``

Run ``bench_incremental.py --help`` for the options; see bench/README.md.
Exit status: 0 when every tool ran (even if a target fails), 1 when a tool
failed or a snapshot is incomplete, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_DIR = BENCH_DIR.parent

KIB = 1024
MIB = 1024 * 1024
BIG_FILE_SIZE = 4 * MIB
SMALL_MIN_LOG2 = 6  # 64 B
SMALL_MAX_LOG2 = 14  # 16 KiB

RATIO_TARGET = 1.10
# Each backup-agent backup is named one hour after the one before (TZ): the
# offset must stay within the 24 hours a TZ string allows.
MAX_AGENT_BACKUPS = 24
RSS_TARGET_BYTES = 50_000_000  # "under 50 MB"

AGENT_CONFIG = """\
[backup]
ionice = "none"
nice = 0

[rotation]
hourly = "always"
"""

RSB_CANDIDATES = (
    BENCH_DIR / ".venv-rsb" / "bin" / "rsync-system-backup",
    PROJECT_DIR / ".venv-peers" / "bin" / "rsync-system-backup",
)


class BenchError(Exception):
    """A tool failed or produced an incomplete snapshot."""


# --------------------------------------------------------------------------
# The source tree


@dataclass(frozen=True)
class SourceTree:
    path: Path
    files: int
    big_files: int
    directories: int
    total_bytes: int


def _plan_tree(files: int, big_files: int, seed: int) -> tuple[list[str], list[tuple[str, int]]]:
    """Directories and (file, size) pairs of the source tree, from a seeded RNG."""
    rng = random.Random(seed)
    dirs: list[tuple[str, int]] = [("", 0)]  # (relative path, depth)
    entries: list[tuple[str, int]] = []
    extensions = (".txt", ".dat", ".json", ".c", ".py", ".log", ".bin", "")
    while len(entries) < files:
        parent, depth = rng.choice([d for d in dirs if d[1] < 4])
        name = f"d{len(dirs):04d}"
        here = f"{parent}/{name}" if parent else name
        dirs.append((here, depth + 1))
        for _ in range(min(files - len(entries), rng.randint(20, 50))):
            log2 = rng.triangular(SMALL_MIN_LOG2, SMALL_MAX_LOG2, SMALL_MAX_LOG2)
            size = int(2**log2)
            fname = f"f{len(entries):06d}{rng.choice(extensions)}"
            entries.append((f"{here}/{fname}", size))
    for index in rng.sample(range(len(entries)), min(big_files, len(entries))):
        entries[index] = (entries[index][0], BIG_FILE_SIZE)
    return [d for d, _ in dirs[1:]], entries


def build_source(workdir: Path, files: int, big_files: int, seed: int) -> tuple[SourceTree, bool]:
    """Build the source tree under workdir, or reuse a complete earlier build."""
    name = f"src-{files}-{big_files}-{seed}"
    path = workdir / name
    marker = workdir / f"{name}.json"
    if marker.exists() and path.is_dir():
        info = json.loads(marker.read_text())
        return SourceTree(path, info["files"], info["big_files"], info["directories"], info["total_bytes"]), True
    if path.exists():
        shutil.rmtree(path)
    dirs, entries = _plan_tree(files, big_files, seed)
    content = random.Random(seed + 1)
    path.mkdir(parents=True)
    for rel in dirs:
        (path / rel).mkdir()
    total = 0
    for rel, size in entries:
        with open(path / rel, "wb") as out:
            out.write(content.randbytes(size))
        total += size
    tree = SourceTree(path, len(entries), min(big_files, len(entries)), len(dirs), total)
    marker.write_text(json.dumps({"files": tree.files, "big_files": tree.big_files,
                                  "directories": tree.directories, "total_bytes": tree.total_bytes}))
    return tree, False


def count_files(root: Path) -> int:
    """Number of non-directory entries below root."""
    return sum(len(filenames) for _, _, filenames in os.walk(root))


# --------------------------------------------------------------------------
# Running and timing a command


def _children_cpu() -> float:
    """User + system seconds of every child process waited for so far (and of theirs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_timed(argv: Sequence[str], log: Path, *, cwd: Path | None = None,
              env: dict[str, str] | None = None) -> float:
    """Run argv with its output in log(.out/.err); return wall seconds or raise BenchError."""
    return run_measured(argv, log, cwd=cwd, env=env)[0]


def run_measured(argv: Sequence[str], log: Path, *, cwd: Path | None = None,
                 env: dict[str, str] | None = None) -> tuple[float, float]:
    """Run argv with its output in log(.out/.err); return (wall, CPU) seconds or raise BenchError.

    CPU is user + system time of the whole process tree (rsync included),
    which machine noise changes far less than the wall time.
    """
    with open(log.with_suffix(".out"), "wb") as out, open(log.with_suffix(".err"), "wb") as err:
        cpu = _children_cpu()
        start = time.perf_counter()
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=cwd, env=env)
        except OSError as exc:
            raise BenchError(f"cannot run {argv[0]}: {exc}") from exc
        elapsed = time.perf_counter() - start
        cpu = _children_cpu() - cpu
    if proc.returncode != 0:
        tail = log.with_suffix(".err").read_text(errors="replace").strip().splitlines()[-15:]
        raise BenchError(f"{' '.join(argv)} exited with {proc.returncode}\n  " + "\n  ".join(tail))
    return elapsed, cpu


def wait_for_next_second(after: float) -> None:
    """Sleep until the wall clock is in a later second than `after` (untimed)."""
    now = time.time()
    if math.floor(now) <= math.floor(after):
        time.sleep(math.floor(after) + 1 - now + 0.005)


# --------------------------------------------------------------------------
# Tools


@dataclass
class Context:
    src: Path
    runs: Path  # destinations, configs and logs of this run
    python: Path
    project: Path
    rsb: Path | None
    agent_rotation: bool  # run backup-agent's whole backup, rotation included (else -b -s)
    before: str  # the commit backup-agent-before runs


@dataclass
class Result:
    full: float = 0.0
    times: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    peak_rss_kib: list[int] = field(default_factory=list)
    full_peak_rss_kib: int | None = None


class Tool(ABC):
    key: str  # command-line name
    label: str  # table name
    note: str = ""
    one_second_names = False  # snapshot names have 1 s resolution

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.dest = ctx.runs / self.key
        self.logs = ctx.runs / "logs"
        self.result = Result()
        self._runs = 0
        self._cpu = 0.0
        self._last_end = 0.0

    def setup(self) -> None:
        self.dest.mkdir(parents=True)
        self.logs.mkdir(exist_ok=True)

    def _timed(self, argv: Sequence[str], **kw: Any) -> float:
        if self.one_second_names:
            wait_for_next_second(self._last_end)
        log = self.logs / f"{self.key}-{self._runs:03d}"
        self._runs += 1
        elapsed, cpu = run_measured(argv, log, **kw)
        self._last_end = time.time()
        self._cpu += cpu
        return elapsed

    def _settled_backup(self) -> tuple[float, float]:
        # Flush the dirty pages the previous tool left (untimed), so that no
        # tool pays for another's writeback.
        os.sync()
        self._cpu = 0.0
        return self.backup(), self._cpu

    def first_backup(self) -> None:
        self.result.full = self._settled_backup()[0]
        self.check_snapshot_count(1)

    def incremental(self) -> None:
        wall, cpu = self._settled_backup()
        self.result.times.append(wall)
        self.result.cpu.append(cpu)
        self.check_snapshot_count(len(self.result.times) + 1)

    def check_snapshot_count(self, expected: int) -> None:
        found = len(self.snapshots())
        if found != expected:
            raise BenchError(f"{self.label}: {found} snapshots after {expected} backups")

    @abstractmethod
    def backup(self) -> float:
        """Make one snapshot of ctx.src; return its wall time in seconds."""

    @abstractmethod
    def snapshots(self) -> list[Path]:
        """The complete snapshots, oldest first; each holds exactly the source's files."""


class Floor(Tool):
    """Bare rsync --link-dest, its snapshots in DEST/snapshots/ as deep as backup-agent's.

    rsync 3.5 opens a --link-dest file by walking its absolute path from /
    one component at a time, twice per file (about six system calls per
    component and file, counted with strace -c): every directory level
    above the snapshots costs 0.3 million calls on 50,000 files. Kept at
    the same depth, the floor differs from backup-agent by the tool, not by
    where the snapshots are.
    """

    key = "floor"
    label = "floor (rsync --link-dest)"

    def setup(self) -> None:
        super().setup()
        self.snapshots_dir = self.dest / "snapshots"
        self.snapshots_dir.mkdir()

    def snapshots(self) -> list[Path]:
        return sorted(p for p in self.snapshots_dir.iterdir() if p.is_dir())

    def backup(self) -> float:
        previous = self.snapshots()
        argv = ["rsync", "-aHAX", "--numeric-ids"]
        if previous:
            argv.append(f"--link-dest={previous[-1]}")
        new = self.snapshots_dir / f"{len(previous):04d}"
        return self._timed([*argv, f"{self.ctx.src}/", f"{new}/"])


class BackupAgent(Tool):
    key = "backup-agent"
    label = "backup-agent"
    one_second_names = True

    def setup(self) -> None:
        super().setup()
        if type(self) is BackupAgent:
            self.note = "whole backup, rotation step included" if self.ctx.agent_rotation else "-b -s: no rotation step"
        self.config = self.ctx.runs / "backup-agent.toml"
        self.config.write_text(AGENT_CONFIG)
        self.env = agent_env(self.ctx)

    def command(self) -> list[str]:
        return [str(self.ctx.python), "-m", "agent.cli"]

    def backup(self) -> float:
        # The whole backup, rotation included; named as the next hour's
        # backup (TZ one hour further east each time, POSIX signs: UTC-3 is
        # three hours east), so "hourly = always" keeps every snapshot.
        # Without --agent-rotation, -b -s: transfer + snapshot only.
        steps = [] if self.ctx.agent_rotation else ["-b", "-s"]
        argv = [*self.command(), "backup", "--no-sudo", *steps, "--config", str(self.config),
                str(self.ctx.src), str(self.dest)]
        env = {**self.env, "TZ": f"UTC-{self._runs}"}
        return self._timed(argv, cwd=self.ctx.project, env=env)

    def snapshots(self) -> list[Path]:
        # DEST/snapshots/ or DEST/<host>/snapshots/, whichever the CLI makes.
        for root in (self.dest / "snapshots", *self.dest.glob("*/snapshots")):
            if root.is_dir():
                return sorted(p for p in root.iterdir()
                              if p.is_dir() and not p.name.endswith(".in-progress"))
        return []


class BackupAgentBefore(BackupAgent):
    key = "backup-agent-before"
    label = "backup-agent before"

    def setup(self) -> None:
        self.code = unpack(self.ctx.before, self.ctx.runs / "before-code")
        super().setup()
        self.label = f"backup-agent at {self.ctx.before}"
        self.note = "the same command, the package as it was then"
        compile_agent(self.ctx, self.code)
        self.env = agent_env(self.ctx, self.code)

    def backup(self) -> float:
        steps = [] if self.ctx.agent_rotation else ["-b", "-s"]
        argv = [*self.command(), "backup", "--no-sudo", *steps, "--config", str(self.config),
                str(self.ctx.src), str(self.dest)]
        return self._timed(argv, cwd=self.code, env={**self.env, "TZ": f"UTC-{self._runs}"})


class BackupAgentRss(BackupAgent):
    key = "backup-agent-rss"
    label = "backup-agent (in-process, RSS)"
    note = "same CLI via bench/_peak_rss.py"

    def command(self) -> list[str]:
        return [str(self.ctx.python), str(BENCH_DIR / "_peak_rss.py")]

    def _peak(self) -> int:
        err = (self.logs / f"{self.key}-{self._runs - 1:03d}.err").read_text(errors="replace")
        values = [line.split("=", 1)[1] for line in err.splitlines() if line.startswith("peak_rss_kib=")]
        if not values:
            raise BenchError(f"{self.label}: no peak_rss_kib= line on stderr")
        return int(values[-1])

    def first_backup(self) -> None:
        super().first_backup()
        self.result.full_peak_rss_kib = self._peak()

    def incremental(self) -> None:
        super().incremental()
        self.result.peak_rss_kib.append(self._peak())


class Rsnapshot(Tool):
    key = "rsnapshot"
    label = "rsnapshot (sync_first, cp -al)"
    note = "not comparable: mirror + cp -al shares inodes with history"

    def setup(self) -> None:
        super().setup()
        self.config = self.ctx.runs / "rsnapshot.conf"
        lines = [
            ("config_version", "1.2"),
            ("snapshot_root", f"{self.dest}/"),
            ("no_create_root", "0"),
            ("cmd_rsync", shutil.which("rsync") or "/usr/bin/rsync"),
            ("cmd_cp", "/bin/cp"),
            ("cmd_rm", "/bin/rm"),
            ("retain", "hourly\t1000"),
            ("sync_first", "1"),
            ("verbose", "2"),
            ("loglevel", "3"),
            # Preserve what the floor and the others preserve (default is -a).
            ("rsync_short_args", "-aHAX"),
            ("lockfile", f"{self.ctx.runs}/rsnapshot.pid"),
            ("backup", f"{self.ctx.src}/\tlocalhost/"),
        ]
        self.config.write_text("".join(f"{k}\t{v}\n" for k, v in lines))

    def backup(self) -> float:
        conf = str(self.config)
        return (self._timed(["rsnapshot", "-c", conf, "sync"])
                + self._timed(["rsnapshot", "-c", conf, "hourly"]))

    def snapshots(self) -> list[Path]:
        found = [p for p in self.dest.glob("hourly.*") if p.is_dir()]
        return sorted(found, key=lambda p: -int(p.suffix[1:]))


class RsyncSystemBackup(Tool):
    key = "rsync-system-backup"
    label = "rsync-system-backup (-b -s)"
    note = "mirror DEST/latest + cp -al; no rotation"
    one_second_names = True

    def backup(self) -> float:
        assert self.ctx.rsb is not None
        # -u: no sudo; -b -s: rsync + snapshot, no rotation (its default
        # rotation would delete snapshots); no desktop notifications.
        argv = [str(self.ctx.rsb), "-u", "--disable-notifications", "-b", "-s",
                str(self.ctx.src), str(self.dest / "latest")]
        return self._timed(argv)

    def snapshots(self) -> list[Path]:
        return sorted(p for p in self.dest.iterdir() if p.is_dir() and p.name != "latest")


TOOLS: dict[str, type[Tool]] = {
    cls.key: cls for cls in (Floor, BackupAgent, BackupAgentBefore, BackupAgentRss, Rsnapshot, RsyncSystemBackup)
}
DEFAULT_TOOLS = ("floor", "backup-agent", "backup-agent-rss", "rsnapshot", "rsync-system-backup")


# --------------------------------------------------------------------------
# Report


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def summarize(tools: list[Tool]) -> dict[str, Any]:
    by_key = {t.key: t for t in tools}
    floor = by_key.get("floor")
    floor_median = _median(floor.result.times) if floor else math.nan
    floor_cpu = _median(floor.result.cpu) if floor else math.nan
    rows: dict[str, Any] = {}
    for tool in tools:
        r = tool.result
        median = _median(r.times)
        cpu = _median(r.cpu)
        rows[tool.key] = {
            "label": tool.label,
            "full_seconds": r.full,
            "times": r.times,
            "median": median,
            "min": min(r.times) if r.times else math.nan,
            "ratio_to_floor": median / floor_median if floor else None,
            "cpu_seconds": r.cpu,
            "cpu_median": cpu,
            "cpu_ratio_to_floor": cpu / floor_cpu if floor else None,
            "peak_rss_kib": r.peak_rss_kib or None,
            "full_peak_rss_kib": r.full_peak_rss_kib,
            "note": tool.note,
        }

    targets: dict[str, Any] = {}
    agent = by_key.get("backup-agent")
    if agent and floor:
        ratio = rows["backup-agent"]["ratio_to_floor"]
        targets["within_1.10x_of_floor"] = {"value": ratio, "pass": ratio <= RATIO_TARGET,
                                            "cpu": rows["backup-agent"]["cpu_ratio_to_floor"]}
    rsb = by_key.get("rsync-system-backup")
    if agent and rsb:
        ours, theirs = rows["backup-agent"]["median"], rows["rsync-system-backup"]["median"]
        targets["faster_than_rsync_system_backup"] = {"value": ours / theirs, "pass": ours < theirs}
    rss = by_key.get("backup-agent-rss")
    if rss and rss.result.peak_rss_kib:
        peak = max(rss.result.peak_rss_kib) * KIB
        targets["peak_rss_under_50MB"] = {"value": peak, "pass": peak < RSS_TARGET_BYTES}
    return {"tools": rows, "targets": targets}


def print_table(summary: dict[str, Any]) -> None:
    head = (f"{'tool':<32} {'median s':>9} {'min s':>8} {'x floor':>8} {'cpu s':>7} {'x floor':>8} "
            f"{'full s':>8} {'peak MiB':>9}  note")
    print(head)
    print("-" * len(head))

    def times(value: float | None) -> str:
        return f"{value:.3f}" if value is not None else "-"

    for row in summary["tools"].values():
        rss = f"{max(row['peak_rss_kib']) / KIB:.1f}" if row["peak_rss_kib"] else "-"
        print(f"{row['label']:<32} {row['median']:>9.3f} {row['min']:>8.3f} {times(row['ratio_to_floor']):>8} "
              f"{row['cpu_median']:>7.3f} {times(row['cpu_ratio_to_floor']):>8} {row['full_seconds']:>8.2f} "
              f"{rss:>9}  {row['note']}")
    targets = summary["targets"]
    if not targets:
        return
    print()
    labels = {
        "within_1.10x_of_floor": lambda v: f"backup-agent within {RATIO_TARGET:.2f}x of floor  ({v:.3f}x; "
                                           f"CPU time {targets['within_1.10x_of_floor']['cpu']:.3f}x)",
        "faster_than_rsync_system_backup":
            lambda v: f"backup-agent faster than rsync-system-backup  ({v:.3f}x its median)",
        "peak_rss_under_50MB":
            lambda v: f"backup-agent process under 50 MB  (peak {v / MIB:.1f} MiB = {v / 1e6:.1f} MB)",
    }
    for key, target in targets.items():
        print(f"{'PASS' if target['pass'] else 'FAIL'}  {labels[key](target['value'])}")


# --------------------------------------------------------------------------
# Main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=50_000, help="files in the source tree (default 50000)")
    p.add_argument("--big-files", type=int, default=10, help="of which 4 MiB files (default 10)")
    p.add_argument("--rounds", type=int, default=5, help="timed incremental rounds (default 5)")
    p.add_argument("--seed", type=int, default=20261122, help="seed of sizes, layout and content")
    p.add_argument("--workdir", type=Path, help="cache for the source tree and place of the runs "
                   "(default: a fresh temp dir under /var/tmp, removed at the end unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep the snapshots and logs of this run")
    p.add_argument("--python", type=Path, default=PROJECT_DIR / ".venv" / "bin" / "python",
                   help="interpreter that runs backup-agent (default: the project's .venv)")
    p.add_argument("--rsb", type=Path, help="rsync-system-backup executable "
                   "(default: bench/.venv-rsb or .venv-peers, else PATH)")
    p.add_argument("--without-rotation", dest="agent_rotation", action="store_false",
                   help="time backup-agent -b -s (transfer and snapshot only, like rsync-system-backup "
                   "-b -s) instead of its whole backup with the rotation step")
    p.add_argument("--tools", default=",".join(DEFAULT_TOOLS),
                   help=f"comma-separated subset of: {', '.join(TOOLS)} (default: {','.join(DEFAULT_TOOLS)})")
    p.add_argument("--before", default="ba38f78",
                   help="the commit whose agent/ backup-agent-before runs (default ba38f78, before the links "
                   "layout's cost was cut)")
    p.add_argument("--json", type=Path, help="also write the numbers to this file")
    args = p.parse_args(argv)
    args.tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = [t for t in args.tools if t not in TOOLS]
    if unknown:
        p.error(f"unknown tool(s): {', '.join(unknown)}")
    if args.files < 1 or args.rounds < 1 or args.big_files < 0:
        p.error("--files and --rounds must be positive, --big-files not negative")
    if args.rounds + 1 > MAX_AGENT_BACKUPS and {"backup-agent", "backup-agent-before", "backup-agent-rss"} & set(args.tools):
        p.error(f"--rounds must be at most {MAX_AGENT_BACKUPS - 1}: each backup-agent backup is named one hour "
                "after the one before, within the 24 hours a TZ offset allows")
    return args


def find_rsb(explicit: Path | None) -> Path | None:
    if explicit:
        return explicit
    for candidate in RSB_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("rsync-system-backup")
    return Path(found) if found else None


def unpack(commit: str, into: Path) -> Path:
    """The package as it was at ``commit`` (git archive), to run as another version."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(PROJECT_DIR), "archive", commit, "agent"], capture_output=True)
    if archive.returncode != 0:
        raise BenchError(f"git archive {commit} agent failed: {archive.stderr.decode(errors='replace').strip()}")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def agent_env(ctx: Context, project: Path | None = None) -> dict[str, str]:
    """backup-agent's environment: the project on PYTHONPATH, the machine lock in the run's directory.

    The lock there, not /run's: a backup or a test running elsewhere on the
    machine would otherwise make a timed backup fail ("another backup is
    running"), and the benchmark never stands in a real backup's way.
    """
    env = dict(os.environ)
    first = str(project or ctx.project)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (first, os.environ.get("PYTHONPATH", "")) if p)
    runtime = ctx.runs / "runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env["BACKUP_AGENT_RUNTIME_DIR"] = str(runtime)
    return env


def compile_agent(ctx: Context, project: Path | None = None) -> None:
    """Compile the package's bytecode once, untimed, as an installed package has it.

    A checkout run with PYTHONDONTWRITEBYTECODE=1 would otherwise compile
    every module of the package again in every timed run (about 0.07 s of
    CPU). The bytecode goes where Python looks for it, the package's
    ``__pycache__`` directories (ignored by git); not a PYTHONPYCACHEPREFIX,
    under which Python would also ignore the standard library's bytecode.
    """
    argv = [str(ctx.python), "-m", "compileall", "-q", str((project or ctx.project) / "agent")]
    env = {k: v for k, v in agent_env(ctx, project).items() if k not in ("PYTHONPYCACHEPREFIX", "PYTHONDONTWRITEBYTECODE")}
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(argv)} exited with {proc.returncode}: {proc.stderr.strip()[-500:]}")


def tool_versions(ctx: Context, keys: list[str]) -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        proc = subprocess.run(argv, capture_output=True, text=True)
        return (proc.stdout or proc.stderr).strip().splitlines()[0] if (proc.stdout or proc.stderr) else "?"

    versions = {"rsync": first_line(["rsync", "--version"])}
    if "rsnapshot" in keys:
        versions["rsnapshot"] = first_line(["rsnapshot", "-V"])
    if "rsync-system-backup" in keys and ctx.rsb:
        py = ctx.rsb.parent / "python"
        versions["rsync-system-backup"] = first_line(
            [str(py), "-c", "import rsync_system_backup as m; print(m.__version__)"])
    return versions


def run(args: argparse.Namespace, workdir: Path) -> int:
    started = time.perf_counter()
    tree, cached = build_source(workdir, args.files, args.big_files, args.seed)
    print(f"source: {tree.files} files ({tree.big_files} of 4 MiB) in {tree.directories} directories, "
          f"{tree.total_bytes / MIB:.1f} MiB, at {tree.path} "
          f"({'cached' if cached else f'built in {time.perf_counter() - started:.1f} s'})")

    runs = workdir / "runs"
    if runs.exists():
        shutil.rmtree(runs)
    runs.mkdir()
    ctx = Context(src=tree.path, runs=runs, python=args.python, project=PROJECT_DIR,
                  rsb=find_rsb(args.rsb), agent_rotation=args.agent_rotation, before=args.before)
    if "rsync-system-backup" in args.tools and ctx.rsb is None:
        print("rsync-system-backup not found: python3 -m venv bench/.venv-rsb && "
              "bench/.venv-rsb/bin/pip install rsync-system-backup (or pass --rsb, or leave it "
              "out with --tools)", file=sys.stderr)
        return 1
    tools = [TOOLS[key](ctx) for key in args.tools]
    versions = tool_versions(ctx, args.tools)
    print("versions: " + "; ".join(f"{k} {v}" for k, v in versions.items()))

    try:
        if {"backup-agent", "backup-agent-rss"} & set(args.tools):
            compile_agent(ctx)
            print(f"backup-agent: {'whole backup with rotation' if args.agent_rotation else '-b -s'}; "
                  f"its bytecode compiled once (untimed) into {ctx.project / 'agent'}/**/__pycache__")
        for tool in tools:
            tool.setup()
            tool.first_backup()
            print(f"first full backup: {tool.label}: {tool.result.full:.2f} s", flush=True)
        for round_no in range(args.rounds):
            # Rotate the order each round so no tool always runs first or last.
            shift = round_no % len(tools)
            order = tools[shift:] + tools[:shift]
            for tool in order:
                tool.incremental()
            print(f"round {round_no + 1}/{args.rounds}: "
                  + ", ".join(f"{t.key} {t.result.times[-1]:.3f} s (cpu {t.result.cpu[-1]:.3f})" for t in tools),
                  flush=True)
        for tool in tools:
            latest = tool.snapshots()[-1]
            found = count_files(latest)
            if found != tree.files:
                raise BenchError(f"{tool.label}: {latest} holds {found} files, source has {tree.files}")
        print(f"checked: the newest snapshot of each tool holds all {tree.files} files\n")
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        print(f"logs: {runs / 'logs'}", file=sys.stderr)
        return 1

    summary = summarize(tools)
    print(f"no-change incremental backup, {args.rounds} rounds, {tree.files} files, "
          f"{tree.total_bytes / MIB:.0f} MiB:\n")
    print_table(summary)
    if args.json:
        payload = {
            "source": {"files": tree.files, "big_files": tree.big_files,
                       "directories": tree.directories, "total_bytes": tree.total_bytes,
                       "seed": args.seed},
            "rounds": args.rounds,
            "python": str(args.python),
            "agent_rotation": args.agent_rotation,
            "versions": versions,
            **summary,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


def in_workdir(args: argparse.Namespace, body: Callable[[argparse.Namespace, Path], int], *, prefix: str, runs: str) -> int:
    """Run ``body`` in --workdir (its ``runs`` subdirectory removed afterwards) or in a fresh temporary
    directory under /var/tmp (removed); both kept with --keep or when the run failed."""
    temporary = args.workdir is None
    if temporary:
        base = "/var/tmp" if os.path.isdir("/var/tmp") else None
        workdir = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    else:
        workdir = args.workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    status = 1
    try:
        status = body(args, workdir)
        return status
    finally:
        if args.keep or status != 0:
            print(f"kept: {workdir}", file=sys.stderr if status else sys.stdout)
        elif temporary:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            shutil.rmtree(workdir / runs, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    return in_workdir(parse_args(argv), run, prefix="bench-incremental-", runs="runs")


if __name__ == "__main__":
    sys.exit(main())
