"""Run a command where a frozen source's snapshots stand at the live paths (docs/ARCHITECTURE.md, "Sources").

Run as ``python -I -m agent.engine.frozen_view`` by ``unshare --mount
--propagation private``, so every mount made here lives only in that private
mount namespace and vanishes with the command; the live system never sees it.
Arguments, all paths absolute:

- ``--carry SRC DST``: bind ``SRC`` (with what is mounted below it) onto
  ``DST``; ``DST`` lies inside the frozen snapshot and must exist there;
- ``--carry-if-present SRC DST``: the same, skipped when ``DST`` is missing;
- ``--over SNAPSHOT PATH``: then bind the snapshot (with all it carries) over
  the live ``PATH``; or ``--root SNAPSHOT`` for ``/``, which a mount over it
  would not change for this process: then the command runs chrooted there;
- ``--`` and the command's argv, which replaces this process.

The mounts are made with mount(2) directly: no shell and no program is
involved between ``unshare`` and the command.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Sequence

MS_BIND = 4096
MS_REC = 16384
#: The exit status when the view cannot be made (the command never ran).
VIEW_FAILED = 125


def _bind(source: str, target: str) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.mount(os.fsencode(source), os.fsencode(target), None, MS_BIND | MS_REC, None) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"cannot bind {source} onto {target}: {os.strerror(errno)}")


def main(argv: Sequence[str]) -> int:
    args = list(argv)
    if "--" not in args or args.index("--") == len(args) - 1:
        print("frozen_view: expected options, --, then the command", file=sys.stderr)
        return VIEW_FAILED
    split = args.index("--")
    options, command = args[:split], args[split + 1 :]
    root: str | None = None
    try:
        index = 0
        while index < len(options):
            option = options[index]
            if option in ("--carry", "--carry-if-present", "--over"):
                source, target = options[index + 1], options[index + 2]
                index += 3
                if option == "--carry-if-present" and not os.path.lexists(target):
                    continue
                _bind(source, target)
            elif option == "--root":
                root = options[index + 1]
                index += 2
            else:
                print(f"frozen_view: unknown option {option}", file=sys.stderr)
                return VIEW_FAILED
        if root is not None:
            os.chroot(root)
            os.chdir("/")
        os.execv(command[0], command)
    except (OSError, IndexError) as exc:
        print(f"frozen_view: {exc}", file=sys.stderr)
    return VIEW_FAILED


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
