"""Run a program with a snapshot bind-mounted read-only at one stable path.

Started as ``unshare --mount --propagation private -- python -I
.../agent/engine/bindrun.py MOUNT SNAPSHOT STABLE -- PROGRAM ARGS...`` (by its
file: it imports nothing but the standard library): inside the
private mount namespace that unshare made, it bind-mounts SNAPSHOT on
STABLE, makes it read-only, changes into it and becomes PROGRAM (exec), so
the mount lives exactly as long as PROGRAM and no one else sees it. Every
off-site snapshot then has the same path, which restic needs to find its
parent and skip unchanged files (docs/ARCHITECTURE.md, "The off-site copy").
An argv in, no shell; the caller's environment is passed on as given.
"""

from __future__ import annotations

import os
import subprocess
import sys


def main(argv: list[str]) -> int:
    if len(argv) < 5 or argv[3] != "--":
        print("usage: bindrun MOUNT SNAPSHOT STABLE -- PROGRAM ARGS...", file=sys.stderr)
        return 2
    mount, snapshot, stable, program = argv[0], argv[1], argv[2], argv[4:]
    if os.path.realpath(stable) != stable or not os.path.isabs(snapshot):
        print(f"bindrun: {stable} must be an absolute path without links, {snapshot} absolute", file=sys.stderr)
        return 2
    for step in ((mount, "--bind", snapshot, stable), (mount, "-o", "remount,bind,ro", stable)):
        done = subprocess.run(step, stdin=subprocess.DEVNULL, check=False)
        if done.returncode != 0:
            print(f"bindrun: {' '.join(step)} failed (exit status {done.returncode})", file=sys.stderr)
            return 125
    os.chdir(stable)
    os.execv(program[0], program)
    return 127  # not reached: execv returns only by raising


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
