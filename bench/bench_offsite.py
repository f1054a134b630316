#!/usr/bin/env python3
"""Benchmark the off-site copy: a no-change copy against a naive ``restic backup`` of each snapshot.

1. Builds the source tree of bench_incremental.py (``--files``, default
   50,000; the same seed, so the same tree), makes a first local snapshot with
   ``backup-agent backup --no-sudo`` (timed: the local snapshot's time) and
   measures the snapshot's size on disk.
2. ``init --offsite`` of a restic repository in a local directory, then the
   first off-site copy (timed: the first upload), and the repository's size.
3. ``--rounds`` rounds: a new local snapshot with nothing changed (untimed;
   a hard-linked tree with a new path and new ctimes), then, in turns that
   swap each round,
   - backup-agent: the off-site step of agent/engine/offsite.py as the cycle
     runs it (the snapshot bind-mounted at the stable path in a private mount
     namespace, ``--parent`` of the previous copy, ``--ignore-ctime``; with
     restic's version check, the repository id check and the listing that
     find the parent; the repository is configured append-only, so no
     ``forget`` follows and the copy alone is timed), and
   - naive: ``restic backup SNAPSHOT_PATH`` of the same new snapshot into a
     second repository, as one would without those three (restic finds no
     parent for a new path and reads every file again), and
   - restic alone (the floor of any copy with restic): the same
     ``restic backup --json --ignore-ctime --parent ID .`` in the stable
     path that backup-agent runs, into a third repository, with nothing of
     backup-agent's before it (no version check, no state file; the mount
     namespace and bind mount are made by the same small helper).
   All three repositories are copies (``cp -a``) of one initialised
   repository, so they have the same key: restic derives it at every
   command, at a cost ``restic init`` calibrates anew for each repository,
   and two calibrations on a busy machine may differ twofold.
   Before each timed run, ``sync``, and with ``--cache cold`` (the default)
   the snapshot's file contents are dropped from the page cache (untimed),
   as a snapshot on a USB disk is not in memory; ``--cache hot`` leaves them.
4. Prints the medians, the ratio backup-agent / naive and the target (at
   most 0.2), restic alone / naive (the least ratio any copy with restic
   0.14 can reach), the first upload's time and the repository's size
   beside the local snapshot's.

Needs root (the private mount namespace), restic 0.14+, rsync. Run from the
project directory:

    python3 bench/bench_offsite.py --files 2000 --rounds 2          # a quick check
    python3 bench/bench_offsite.py --files 50000 --rounds 3 --workdir /var/tmp/bench-offsite

Exit status: 0 when everything ran (even if the target is missed), 1 when
something failed, 2 on a usage error.
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
for path in (str(PROJECT_DIR), str(BENCH_DIR)):
    if path not in sys.path:
        sys.path.insert(0, path)

from bench_incremental import build_source  # noqa: E402
from tests.conftest import _trusted_base  # noqa: E402

from agent.config.load import load_settings  # noqa: E402
from agent.core.errors import BackupAgentError  # noqa: E402
from agent.core.commands import Runner  # noqa: E402
from agent.core.events import Emitter  # noqa: E402
from agent.engine import offsite  # noqa: E402
from agent.repository.store import Repository  # noqa: E402

TARGET_RATIO = 0.2


def du(path: Path) -> int:
    """Bytes on disk below path (hard links once), as du counts them."""
    done = subprocess.run(["du", "-s", "-B1", str(path)], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[0])


def human(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


def evict(root: Path) -> None:
    """Drop the page cache of every file below root (posix_fadvise DONTNEED): as cold as a snapshot on a USB disk.

    Only these files' pages go (hard links share them, so every snapshot of
    the tree is cold); inodes and directories stay cached, as they would be
    after the local backup walked them. Nothing else on the machine is touched.
    """
    for directory, _dirs, files in os.walk(root):
        for name in files:
            try:
                fd = os.open(os.path.join(directory, name), os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def cli(python: str, config: Path, *arguments: str) -> None:
    done = subprocess.run(
        [python, "-m", "agent.cli", "--config", str(config), *arguments], cwd=PROJECT_DIR,
        stdin=subprocess.DEVNULL, capture_output=True, text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"backup-agent {' '.join(arguments)} exited {done.returncode}: {done.stderr.strip()[-500:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=50_000)
    parser.add_argument("--big-files", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=20261122)
    parser.add_argument("--workdir", type=Path, help="keep the source tree here and reuse it")
    parser.add_argument("--python", default=str(PROJECT_DIR / ".venv" / "bin" / "python"))
    parser.add_argument(
        "--cache", choices=("cold", "hot"), default="cold",
        help="cold (default): the snapshot's file contents are dropped from the page cache before each timed run, "
        "as for a snapshot on a USB disk; hot: left as the local backup left them",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--keep", action="store_true", help="keep the run's directory")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_offsite: needs root (the copy bind-mounts the snapshot in a private mount namespace)", file=sys.stderr)
        return 2
    restic_program = shutil.which("restic")
    if restic_program is None:
        print("bench_offsite: restic is not installed (apt-get install -y restic)", file=sys.stderr)
        return 2
    base = args.workdir or Path(tempfile.mkdtemp(prefix="bench-offsite-", dir="/var/tmp"))
    base.mkdir(parents=True, exist_ok=True)
    tree, reused = build_source(base, args.files, args.big_files, args.seed)
    # The config and the password in a directory only root can write, as the trust checks want
    # (the tests' root-owned base under root's home); the repositories beside them.
    trusted = _trusted_base()
    if trusted is None:
        print("bench_offsite: no root-owned home directory closed to others to keep the password in", file=sys.stderr)
        return 2
    run = Path(tempfile.mkdtemp(prefix="bench-offsite-", dir=trusted))
    os.chmod(run, 0o700)
    local, naive_repo, floor_repo, cache = run / "local", run / "naive", run / "floor", run / "cache"
    password = run / "password"
    password.write_text("bench password\n")
    os.chmod(password, 0o600)
    # Two configs: the local backups alone (untimed between rounds), and the same with the [[offsite]] timed here.
    local_config, config = run / "local.toml", run / "config.toml"
    local_config.write_text(
        f'[backup]\nsource = "{tree.path}"\nrepository = "{local}"\nionice = "none"\nnice = 0\n'
        f'[rotation]\nhourly = "always"\n[system]\nstate_dir = "{run / "state"}"\n'
    )
    config.write_text(
        local_config.read_text()
        + f'[[offsite]]\nname = "bench"\nrepository = "{run / "restic"}"\npassword_file = "{password}"\ninterval = "0"\n'
        # append_only: no forget after the copy, so the copy itself is what is timed (prune and check are not due).
        + "append_only = true\n"
    )
    os.environ["BACKUP_AGENT_RUNTIME_DIR"] = str(run)
    settings = load_settings(str(config))
    site = settings.offsite[0]
    naive_env = {
        "PATH": "/usr/bin:/bin", "RESTIC_REPOSITORY": str(naive_repo), "RESTIC_PASSWORD_FILE": str(password),
        "RESTIC_CACHE_DIR": str(cache), "HOME": str(cache),
    }
    try:
        start = time.perf_counter()
        cli(args.python, local_config, "backup", "--no-sudo")
        local_time = time.perf_counter() - start
        repo = Repository.open(str(local))
        first = repo.latest_name()
        if first is None:
            raise RuntimeError("the first local backup made no snapshot")
        local_size = du(Path(repo.snapshot_path(first)))
        # The offsite step alone, without the cycle: the init is not timed.
        offsite.initialise(settings, site, Runner())
        # The naive run's repository has the same key as ours (a copy of it, still empty).
        subprocess.run(["cp", "-a", "--", str(run / "restic"), str(naive_repo)], check=True)
        copier = offsite.OffsiteCopy(settings, Emitter(), Runner())
        subprocess.run(["sync"], check=True)
        start = time.perf_counter()
        [made] = copier.run(repo)
        first_upload = time.perf_counter() - start
        if made.state != "done":
            raise RuntimeError(f"the first off-site copy did not complete: {made.message}")
        repo_size = du(run / "restic")
        # restic alone starts where ours is after the first copy: the same repository, its copy as the parent.
        subprocess.run(["cp", "-a", "--", str(run / "restic"), str(floor_repo)], check=True)
        cache.mkdir(mode=0o700, exist_ok=True)
        # and with ours' restic cache (named by the repository's id, which the copy shares), as warm as ours.
        subprocess.run(["cp", "-a", "--", str(run / "state" / "restic-cache"), str(cache / "floor")], check=True)
        floor_env = {**naive_env, "RESTIC_REPOSITORY": str(floor_repo), "RESTIC_CACHE_DIR": str(cache / "floor"), "HOME": str(cache / "floor")}
        floor_parent = made.offsite_id
        os.makedirs(offsite.STABLE_PATH, mode=0o700, exist_ok=True)
        subprocess.run([restic_program, "backup", "-q", repo.snapshot_path(first)], env=naive_env, check=True, capture_output=True)
        ours: list[float] = []
        naive: list[float] = []
        floor: list[float] = []
        for round_number in range(args.rounds):
            time.sleep(1.05)  # a new snapshot name
            cli(args.python, local_config, "backup", "--no-sudo")
            newest = repo.latest_name()
            if newest is None:
                raise RuntimeError("no snapshot")
            order = ("ours", "naive", "floor") if round_number % 2 == 0 else ("floor", "naive", "ours")
            for which in order:
                subprocess.run(["sync"], check=True)
                if args.cache == "cold":
                    evict(Path(repo.snapshot_path(newest)))
                start = time.perf_counter()
                if which == "ours":
                    [made] = copier.run(repo)
                    if made.state != "done":
                        raise RuntimeError(f"the off-site copy did not complete: {made.message}")
                    ours.append(time.perf_counter() - start)
                elif which == "naive":
                    subprocess.run([restic_program, "backup", "-q", repo.snapshot_path(newest)], env=naive_env, check=True, capture_output=True)
                    naive.append(time.perf_counter() - start)
                else:
                    argv = [
                        *offsite.namespace_prefix(settings, repo.snapshot_path(newest)), restic_program, "backup", "--json",
                        "--ignore-ctime", "--host", "bench", "--parent", str(floor_parent), ".",
                    ]
                    done = subprocess.run(argv, env=floor_env, check=True, capture_output=True, text=True)
                    floor.append(time.perf_counter() - start)
                    floor_parent = json.loads(done.stdout.splitlines()[-1])["snapshot_id"]
            summary = made.summary
            changed = f"{summary.files_new}/{summary.files_changed}" if summary is not None else "?"
            print(
                f"round {round_number + 1}: backup-agent {ours[-1]:.2f} s (files new/changed {changed}), naive {naive[-1]:.2f} s, "
                f"restic alone {floor[-1]:.2f} s", flush=True,
            )
        ratio = statistics.median(ours) / statistics.median(naive)
        floor_ratio = statistics.median(floor) / statistics.median(naive)
        figures = {
            "files": tree.files, "source_bytes": tree.total_bytes, "rounds": args.rounds, "tree_reused": reused,
            "ours_s": ours, "naive_s": naive, "restic_alone_s": floor, "ratio": ratio, "restic_alone_ratio": floor_ratio,
            "target": TARGET_RATIO, "met": ratio <= TARGET_RATIO,
            "cache": args.cache, "first_local_snapshot_s": local_time, "local_snapshot_bytes": local_size,
            "first_upload_s": first_upload, "offsite_repository_bytes": repo_size,
        }
        print(f"\nsource: {tree.files} files, {human(tree.total_bytes)}; {args.rounds} rounds, no change between snapshots; "
              f"{args.cache} page cache for the snapshot's contents")
        print(f"{'':32} {'median s':>9}")
        print(f"{'backup-agent off-site step':32} {statistics.median(ours):9.2f}")
        print(f"{'naive restic backup SNAPSHOT':32} {statistics.median(naive):9.2f}")
        print(f"{'restic alone (--parent, stable)':32} {statistics.median(floor):9.2f}")
        print(f"ratio backup-agent / naive: {ratio:.3f}x (target <= {TARGET_RATIO}x: {'met' if ratio <= TARGET_RATIO else 'MISSED'})")
        print(f"ratio restic alone / naive: {floor_ratio:.3f}x (the least any copy with this restic can reach); "
              f"backup-agent / restic alone: {statistics.median(ours) / statistics.median(floor):.3f}x")
        print(f"first local snapshot: {local_time:.1f} s, {human(local_size)} on disk")
        print(f"first off-site upload: {first_upload:.1f} s, restic repository {human(repo_size)} "
              f"({repo_size / local_size:.2f}x the local snapshot)")
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2) + "\n")
    except (RuntimeError, subprocess.CalledProcessError, OSError, BackupAgentError) as exc:
        print(f"bench_offsite: {exc}; the run's directory is kept: {run}", file=sys.stderr)
        return 1
    if not args.keep:
        shutil.rmtree(run, ignore_errors=True)
        if args.workdir is None:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
