"""Run the backup-agent CLI in this process and report its peak memory.

Usage: python bench/_peak_rss.py ARGS...   (the arguments of `backup-agent`)

Calls ``agent.cli.main(ARGS)`` in-process, then prints ``peak_rss_kib=N`` on
stderr, where N is VmHWM from /proc/self/status: the high-water mark of this
Python process's resident memory. Child processes (rsync) are separate
processes and are not included. Exits with the CLI's status.
"""

from __future__ import annotations

import sys
from pathlib import Path


def _status(code: object) -> int:
    """Turn a return value or SystemExit code into an exit status."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def peak_rss_kib() -> int:
    """This process's peak resident set size (VmHWM) in KiB."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("VmHWM not found in /proc/self/status")


def main() -> int:
    project = str(Path(__file__).resolve().parent.parent)
    if project not in sys.path:
        sys.path.insert(0, project)
    from agent.cli import main as cli_main

    try:
        status = _status(cli_main(sys.argv[1:]))
    except SystemExit as exc:
        status = _status(exc.code)
    sys.stdout.flush()
    print(f"peak_rss_kib={peak_rss_kib()}", file=sys.stderr, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
