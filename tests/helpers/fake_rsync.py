#!/usr/bin/env python3
"""A stand-in for rsync, at the process boundary (tests/test_cycle_robustness.py).

A test sets a copy of this executable as ``[commands] rsync`` (in a directory
only root can write, where the config accepts it as root). The
cycle runs it with a clean environment, so it finds what to do in
``fake-rsync.json``, looked for in the directories above its destination
argument (a test writes it into its tmp_path, beside the repository):

    {"exit": 23,                 # the status to exit with, or "SIGKILL" to kill itself
     "stderr": ["rsync: ...", ...],   # lines written to stderr after the copy
     "sleep": 0,                 # seconds to sleep after the copy (to be killed meanwhile)
     "copy": true}               # copy SRC/ to DEST/ with the real rsync first

It copies the last two arguments (``SRC/ DEST/``) with the real
``/usr/bin/rsync -a`` (passing on ``--link-dest`` options), prints a
``--stats``-like block on stdout like rsync does, appends its argv to
``fake-rsync.json.argv``, touches ``fake-rsync.json.ready`` once it has
copied and written its output, and then exits as told.
"""

import json
import os
import signal
import subprocess
import sys
import time

REAL_RSYNC = "/usr/bin/rsync"


def _count(source: str) -> tuple[int, int, int]:
    regular = directories = size = 0
    for directory, dirnames, filenames in os.walk(source):
        directories += 1
        for name in filenames:
            info = os.lstat(os.path.join(directory, name))
            if not os.path.islink(os.path.join(directory, name)):
                regular += 1
                size += info.st_size
    return regular, directories, size


def _find_behaviour(target: str) -> str:
    directory = os.path.abspath(target)
    for _ in range(6):
        candidate = os.path.join(directory, "fake-rsync.json")
        if os.path.isfile(candidate):
            return candidate
        directory = os.path.dirname(directory)
    raise SystemExit(f"fake rsync: no fake-rsync.json above {target}")


def main() -> int:
    args = sys.argv[1:]
    source, target = args[-2], args[-1]
    me = _find_behaviour(target)
    with open(me, encoding="utf-8") as handle:
        behaviour = json.load(handle)
    with open(me + ".argv", "a", encoding="utf-8") as handle:
        handle.write(json.dumps(sys.argv) + "\n")
    dry_run = "--dry-run" in args or "-n" in args
    if behaviour.get("copy", True) and not dry_run:
        link_dests = [a for a in args if a.startswith("--link-dest=")]
        subprocess.run([REAL_RSYNC, "-a", *link_dests, source, target], check=True)
    regular, directories, size = _count(source)
    files = regular + directories
    print(f"Number of files: {files} (reg: {regular}, dir: {directories})")
    print(f"Number of created files: {files} (reg: {regular}, dir: {directories})")
    print("Number of deleted files: 0")
    print(f"Number of regular files transferred: {regular}")
    print(f"Total file size: {size} bytes")
    print(f"Total transferred file size: {size} bytes")
    print(f"Literal data: {size} bytes")
    print("Matched data: 0 bytes")
    print("File list size: 0")
    print(f"Total bytes sent: {size}")
    print("Total bytes received: 100")
    print()
    print(f"sent {size} bytes  received 100 bytes  1000.00 bytes/sec")
    sys.stdout.flush()
    for line in behaviour.get("stderr", []):
        print(line, file=sys.stderr)
    sys.stderr.flush()
    with open(me + ".ready", "w", encoding="utf-8") as handle:
        handle.write("copied\n")
    time.sleep(float(behaviour.get("sleep", 0)))
    status = behaviour.get("exit", 0)
    if status == "SIGKILL":
        os.kill(os.getpid(), signal.SIGKILL)
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
