#!/usr/bin/env python3
"""Benchmark what the system state adds to a no-change incremental backup.

Two repositories of the same source tree (bench_incremental's builder:
``--files`` files, default 50,000), backed up alike except that one stores
the system state: the package lists of every package manager present
(``[packages] enabled = true``) and one command source, ``sqlite3 DB .dump``
of a SQLite database of ``--rows`` rows standing in for a database server.
After a first backup of each (which captures everything: shown for
information), ``--rounds`` rounds time a no-change incremental of each,
interleaved, the order alternating from round to round. In those, the
package database and the dump did not change: the package capture is
skipped (its files hard-linked) and the dump, streamed and compared with the
previous copy, is hard-linked too.

The cycles run in this process (``agent.engine.cycle.Cycle``, rsync and all
the steps, rotation left out so that every snapshot stays), so the ``system-state``
step's own duration is read from its events. Printed: the median cycle
without and with the system state (the floor is the cycle without, measured
in the same run), the median ``system-state`` step, its share of the cycle
with it, and the target: under 5 %.

Run it with the project's Python (it imports ``agent``)::

    .venv/bin/python bench/bench_sysstate.py --files 2000 --rounds 3     # a quick check
    .venv/bin/python bench/bench_sysstate.py                              # 50,000 files, 5 rounds

Exit status: 0 when every run worked (even if the target is missed), 1 when
one failed, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_DIR = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(PROJECT_DIR))

from bench_incremental import BenchError, build_source, wait_for_next_second  # noqa: E402

from agent.config.model import CommandSource, Commands, Packages, Settings  # noqa: E402
from agent.core.commands import Runner  # noqa: E402
from agent.core.events import Emitter, Event, StepEvent  # noqa: E402
from agent.engine.cycle import Cycle, Request  # noqa: E402
from agent.engine.sysstate import dumps  # noqa: E402

SHARE_TARGET = 0.05  # the system state's step: under 5 % of the cycle
SQLITE3 = "/usr/bin/sqlite3"


def make_database(path: Path, rows: int) -> int:
    """A SQLite database of ``rows`` rows of about 100 bytes; its dump's size."""
    with sqlite3.connect(path) as db:
        db.execute("create table orders (id integer primary key, customer text, item text, note text)")
        db.executemany(
            "insert into orders (customer, item, note) values (?, ?, ?)",
            ((f"customer {i % 997}", f"item {i % 131}", "n" * 60) for i in range(rows)),
        )
    return sum(len(line) + 1 for line in sqlite3.connect(path).iterdump())


class Timed:
    """One cycle run, with the time of each step from its events."""

    def __init__(self) -> None:
        self.starts: dict[str, float] = {}
        self.steps: dict[str, float] = {}
        self.detail: dict[str, Any] = {}

    def __call__(self, event: Event) -> None:
        if isinstance(event, StepEvent):
            now = time.perf_counter()
            if event.state == "start":
                self.starts[event.step] = now
            elif event.step in self.starts:
                self.steps[event.step] = now - self.starts[event.step]
                self.detail[event.step] = dict(event.detail)

    def parts(self) -> tuple[float, float, bool]:
        """The dump's and the package capture's own seconds, and whether every part was reused (linked)."""
        state = self.detail.get("system-state", {})
        commands = state.get("commands", {}).values()
        managers = state.get("packages", {}).values()
        reused = all(c.get("linked") for c in commands) and all(m.get("unchanged") for m in managers)
        return sum(c.get("seconds", 0.0) for c in commands), sum(m.get("seconds", 0.0) for m in managers), reused


def run_cycle(settings: Settings, source: Path, repo: Path) -> tuple[float, Timed]:
    timed = Timed()
    emitter = Emitter()
    emitter.subscribe(timed)
    request = Request(settings=settings, source=str(source), repository=str(repo), steps=frozenset({"backup", "snapshot"}))
    start = time.perf_counter()
    outcome = Cycle(request, emitter, Runner()).run()
    elapsed = time.perf_counter() - start
    if outcome.snapshot is None or outcome.partial:
        raise BenchError(f"the backup into {repo} made no complete snapshot")
    return elapsed, timed


def dump_costs(database: Path, work: Path, rounds: int) -> dict[str, float]:
    """The command source alone, medians in seconds: the bare dump, the dump streamed into a SHA-256 (what
    comparing by checksum would cost), our capture when the dump is unchanged (compared with the previous
    copy byte for byte and linked: no write), and our capture with no previous copy (written, fsynced)."""
    source = CommandSource(name="shop", command=(SQLITE3, str(database), ".dump"), file="shop.sql")
    previous = work / "previous"
    previous.mkdir()

    def capture(index: int, with_previous: bool) -> float:
        target = work / f"{'same' if with_previous else 'new'}-{index}"
        target.mkdir()
        out = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
        before = os.open(previous, os.O_RDONLY | os.O_DIRECTORY) if with_previous else None
        try:
            start = time.perf_counter()
            record = dumps.capture(source, Runner(), out, before, print)
            elapsed = time.perf_counter() - start
        finally:
            os.close(out)
            if before is not None:
                os.close(before)
        if with_previous and not record["linked"]:
            raise BenchError("the unchanged dump was not linked")
        return elapsed

    def bare() -> float:
        start = time.perf_counter()
        subprocess.run(source.command, stdout=subprocess.DEVNULL, check=True)
        return time.perf_counter() - start

    def hashed() -> float:
        digest = hashlib.sha256()
        start = time.perf_counter()
        Runner().run(source.command, step="bench", on_stdout_data=digest.update)
        return time.perf_counter() - start

    first = os.open(previous, os.O_RDONLY | os.O_DIRECTORY)
    try:
        dumps.capture(source, Runner(), first, None, print)
    finally:
        os.close(first)
    times: dict[str, list[float]] = {"bare": [], "hashed": [], "unchanged": [], "written": []}
    for index in range(rounds):
        times["bare"].append(bare())
        times["hashed"].append(hashed())
        times["unchanged"].append(capture(index, True))
        times["written"].append(capture(index, False))
    return {key: statistics.median(values) for key, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=50_000, help="files in the source tree (default 50000)")
    p.add_argument("--big-files", type=int, default=10, help="of which 4 MiB files (default 10)")
    p.add_argument("--seed", type=int, default=20261122, help="seed of the tree (bench_incremental's default)")
    p.add_argument("--rows", type=int, default=50_000, help="rows of the dumped database (default 50000, a 5 MiB dump)")
    p.add_argument("--rounds", type=int, default=5, help="timed no-change rounds (default 5)")
    p.add_argument("--workdir", type=Path, help="cache for the source tree (default: a temporary directory)")
    p.add_argument("--json", type=Path, help="also write the numbers to this file")
    args = p.parse_args(argv)
    if args.files < 1 or args.rounds < 1:
        p.error("--files and --rounds must be at least 1")
    if not Path(SQLITE3).is_file() or shutil.which("rsync") is None:
        print("needs rsync and sqlite3 (apt-get install -y rsync sqlite3)", file=sys.stderr)
        return 2

    own = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="bench-sysstate-", dir="/var/tmp")) if own else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    runs = Path(tempfile.mkdtemp(prefix="run-", dir=workdir))
    # The machine lock of these cycles is this run's own, not /run's (another backup may hold that).
    os.environ.setdefault("BACKUP_AGENT_RUNTIME_DIR", str(runs))
    try:
        tree, reused = build_source(workdir, args.files, args.big_files, args.seed)
        database = runs / "shop.sqlite"
        dump_bytes = make_database(database, args.rows)
        rsync = shutil.which("rsync") or "/usr/bin/rsync"
        base = Settings(
            path=None, source=str(tree.path), ionice="none", nice=0, packages=Packages(enabled=False),
            commands=dataclasses.replace(Commands(), rsync=rsync),
        )
        with_state = dataclasses.replace(
            base,
            packages=Packages(enabled=True),
            command_sources=(CommandSource(name="shop", command=(SQLITE3, str(database), ".dump"), file="shop.sql"),),
        )
        plain_repo, state_repo = runs / "plain", runs / "state"
        print(f"source: {tree.files} files, {tree.total_bytes / 2**20:.0f} MiB ({'reused' if reused else 'built'}); "
              f"dump: {args.rows} rows, {dump_bytes / 2**20:.1f} MiB")
        first_plain, _ = run_cycle(base, tree.path, plain_repo)
        first_state, first_timed = run_cycle(with_state, tree.path, state_repo)
        first_step = first_timed.steps.get("system-state", 0.0)
        print(f"first backup: {first_plain:.2f} s without, {first_state:.2f} s with the system state "
              f"(its step {first_step:.2f} s: everything captured)")

        plain_times: list[float] = []
        state_times: list[float] = []
        step_times: list[float] = []
        dump_times: list[float] = []
        package_times: list[float] = []
        recaptured = 0
        last = time.time()
        for round_index in range(args.rounds):
            order = ("plain", "state") if round_index % 2 == 0 else ("state", "plain")
            for which in order:
                wait_for_next_second(last)
                if which == "plain":
                    elapsed, _ = run_cycle(base, tree.path, plain_repo)
                    plain_times.append(elapsed)
                else:
                    elapsed, timed = run_cycle(with_state, tree.path, state_repo)
                    state_times.append(elapsed)
                    step_times.append(timed.steps["system-state"])
                    dump, packaged, reused = timed.parts()
                    dump_times.append(dump)
                    package_times.append(packaged)
                    recaptured += not reused
                last = time.time()
            print(f"round {round_index + 1}: without {plain_times[-1]:.2f} s, with {state_times[-1]:.2f} s "
                  f"(system-state step {step_times[-1] * 1000:.0f} ms: dump {dump_times[-1] * 1000:.0f} ms, "
                  f"packages {package_times[-1] * 1000:.0f} ms)")

        plain, state, step = (statistics.median(t) for t in (plain_times, state_times, step_times))
        share = step / state
        overhead = (state - plain) / plain
        print()
        print(f"no-change incremental of {tree.files} files, median of {args.rounds} rounds:")
        print(f"  cycle without system state (the floor): {plain:.3f} s")
        print(f"  cycle with it:                          {state:.3f} s  (ratio {state / plain:.3f} to the floor)")
        print(f"  its system-state step:                  {step * 1000:.1f} ms "
              f"(the dump {statistics.median(dump_times) * 1000:.1f} ms, the packages {statistics.median(package_times) * 1000:.1f} ms)")
        if recaptured:
            print(f"  note: in {recaptured} round(s) something changed (the package database?) and was captured again")
        verdict = "met" if share < SHARE_TARGET else "MISSED"
        print(f"  share of the cycle: {share * 100:.2f} % (target: under {SHARE_TARGET * 100:.0f} %): {verdict}")
        print(f"  difference between the two cycles: {overhead * 100:+.2f} % (noise included)")
        costs = dump_costs(database, Path(tempfile.mkdtemp(prefix="dump-", dir=runs)), max(args.rounds, 5))
        print()
        print(f"the command source alone ({dump_bytes / 2**20:.1f} MiB dump), medians:")
        print(f"  sqlite3 .dump > /dev/null (its floor):           {costs['bare'] * 1000:.0f} ms")
        print(f"  streamed through the runner into a SHA-256:      {costs['hashed'] * 1000:.0f} ms")
        print(f"  unchanged: compared with the old copy and linked: {costs['unchanged'] * 1000:.0f} ms")
        print(f"  no previous copy: written and fsynced:           {costs['written'] * 1000:.0f} ms")
        if args.json is not None:
            args.json.write_text(json.dumps({
                "files": tree.files, "rows": args.rows, "dump_bytes": dump_bytes, "rounds": args.rounds,
                "first_plain_s": first_plain, "first_state_s": first_state, "first_step_s": first_step,
                "plain_s": plain_times, "state_s": state_times, "step_s": step_times,
                "median_plain_s": plain, "median_state_s": state, "median_step_s": step,
                "dump_costs_s": costs, "dump_s": dump_times, "packages_s": package_times, "recaptured_rounds": recaptured,
                "share": share, "share_target": SHARE_TARGET,
            }, indent=2))
        return 0
    except BenchError as exc:
        print(f"bench_sysstate: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(runs, ignore_errors=True)
        if own:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
