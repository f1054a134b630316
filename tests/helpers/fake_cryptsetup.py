"""A STAND-IN for ``cryptsetup open``/``close``, for tests only (tests/test_passphrase_unlock.py).

This kernel has no device-mapper, so the real ``cryptsetup open`` fails with
"Cannot initialize device-mapper" (../shared/TESTING.md). The tests replace
ONLY that mapping step, at the process boundary: this script is what
``[commands] cryptsetup`` points to. The passphrase is still checked for
real: what arrives on standard input is handed, on standard input again, to
the REAL ``cryptsetup open --test-passphrase --key-file=- DEVICE`` against
the real LUKS2 header on the loop device, and its exit status (2 for a wrong
passphrase) is this one's.

``render(config)`` returns the executable (config baked in, as in
fake_cryptdisks.py). The config says:

    cryptsetup  the real program
    mapper_dir  where the mapped device appears: <mapper_dir>/<name>
    targets     {name: block device}: the plain loop device standing for the decrypted contents
    log         a file to which each call appends one JSON line: {"argv", "exit", "stdin_bytes"}
                (the argv as given, to prove the passphrase is not in it; only the LENGTH of stdin)

``open [options] --key-file=- DEVICE NAME``: checks the options are ones
cryptsetup knows, the key on stdin, then links <mapper_dir>/NAME to the target.
``close NAME``: refuses while the target is mounted, else removes the link.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

KNOWN = {
    "--type", "--key-file=-", "--allow-discards", "--readonly", "--header", "--key-slot",
    "--perf-same_cpu_crypt", "--perf-submit_from_crypt_cpus", "--perf-no_read_workqueue", "--perf-no_write_workqueue",
}


def render(config: dict[str, Any]) -> str:
    """The executable stand-in's text, with ``config`` baked in."""
    with open(__file__, encoding="utf-8") as handle:
        source = handle.read()
    return (
        f"#!{sys.executable} -I\n"
        f"{source}\n\n"
        f"CONFIG = {json.dumps(config)!r}\n"
        "if __name__ == '__main__':\n"
        "    sys.exit(main(json.loads(CONFIG), sys.argv))\n"
    )


def _mounted_devices() -> set[str]:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as handle:
        return {line.split()[2] for line in handle if len(line.split()) > 2}


def _open(config: dict[str, Any], args: list[str], key: bytes) -> int:
    if len(args) < 2 or "--key-file=-" not in args:
        print("stand-in: expected open [options] --key-file=- DEVICE NAME", file=sys.stderr)
        return 1
    device, name = args[-2], args[-1]
    options = args[:-2]
    for index, option in enumerate(options):
        if option.startswith("-") and option not in KNOWN:
            print(f"cryptsetup: unknown option {option}", file=sys.stderr)
            return 1
        if option in ("--type", "--header", "--key-slot") and index + 1 >= len(options):
            return 1
    check = subprocess.run(
        [config["cryptsetup"], "open", "--test-passphrase", "--key-file=-", device], input=key, capture_output=True
    )
    if check.returncode != 0:
        sys.stderr.write(check.stderr.decode("utf-8", "replace"))
        return check.returncode
    mapped = os.path.join(config["mapper_dir"], name)
    if os.path.lexists(mapped):
        print(f"Device {name} already exists.", file=sys.stderr)
        return 5
    os.makedirs(config["mapper_dir"], exist_ok=True)
    os.symlink(config["targets"][name], mapped)
    return 0


def _close(config: dict[str, Any], name: str) -> int:
    mapped = os.path.join(config["mapper_dir"], name)
    if not os.path.lexists(mapped):
        print(f"Device {name} is not active.", file=sys.stderr)
        return 4
    info = os.stat(mapped)
    if f"{os.major(info.st_rdev)}:{os.minor(info.st_rdev)}" in _mounted_devices():
        print(f"Device {name} is still in use.", file=sys.stderr)
        return 5
    os.unlink(mapped)
    return 0


def main(config: dict[str, Any], argv: list[str]) -> int:
    key = sys.stdin.buffer.read() if len(argv) > 1 and argv[1] == "open" else b""
    if len(argv) > 1 and argv[1] == "open":
        status = _open(config, argv[2:], key)
    elif len(argv) == 3 and argv[1] == "close":
        status = _close(config, argv[2])
    else:
        print(f"stand-in: unexpected {argv[1:]}", file=sys.stderr)
        status = 1
    with open(config["log"], "a", encoding="utf-8") as log:
        log.write(json.dumps({"argv": argv[1:], "exit": status, "stdin_bytes": len(key)}) + "\n")
    return status
