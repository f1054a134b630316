"""A STAND-IN for cryptdisks_start / cryptdisks_stop, for tests only (tests/test_disk.py).

This kernel has no device-mapper, so the real ``cryptdisks_start`` fails with
"Cannot initialize device-mapper" (../shared/TESTING.md). The tests replace
ONLY that mapping step, at the process boundary: this script is what
``[commands] cryptdisks_start``/``cryptdisks_stop`` point to. Everything
around it stays real: the LUKS2 header on a loop device, blkid, cryptsetup
checking the key, mount, umount, mountinfo.

``render(config)`` returns an executable script: a shebang for this Python,
this file's source, and the config baked in as a literal (the Runner gives
children a clean environment, so nothing can reach it through variables).
The config says:

    action      "start" or "stop"
    crypttab    the crypttab to read (the test's, in its tmp directory)
    mapper_dir  where mapped devices appear: <mapper_dir>/<name>, like /dev/mapper
    targets     {name: block device}: the plain (ext4, ...) loop device that
                stands for the decrypted contents of <name>
    cryptsetup, blkid   absolute paths of the real programs
    log         a file to which each call appends one JSON line {"action", "argv", "exit"}
    variant     "normal", or a failure to act out:
                "maps-nothing"        start: checks the key, exits 0, maps nothing
                "map-then-fail"       start: maps, then exits 1 (half done)
                "stop-fails"          stop: exits 1, leaves the mapping
                "stop-leaves-mapping" stop: exits 0, leaves the mapping

start NAME, like the real one: finds NAME's line in crypttab (exit 1 if
none), resolves ``UUID=...`` with the real ``blkid``, does nothing if the
mapping exists already ("running"), needs a key file (a passphrase prompt is
not acted out), checks the key against the REAL LUKS header with
``cryptsetup open --test-passphrase --key-file KEY DEVICE`` (exit 1 with
cryptsetup's message on a wrong key), then creates <mapper_dir>/<name> as a
symbolic link to the target device.

stop NAME: "stopped" if there is no mapping; refuses (exit 1, "busy") while
the target device is mounted anywhere, as cryptsetup close would; else
removes the link.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any


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


def _say(name: str, what: str) -> None:
    print(f"{name} ({what})...", flush=True)


def _crypttab_line(path: str, name: str) -> list[str] | None:
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except FileNotFoundError:
        return None
    for line in lines:
        fields = line.split()
        if fields and not fields[0].startswith("#") and fields[0] == name and len(fields) >= 2:
            return fields
    return None


def _resolve(config: dict[str, Any], spec: str) -> str | None:
    if spec.startswith("UUID="):
        # -c /dev/null: blkid trusts a cached answer for 2 s, and tests reuse loop devices faster.
        found = subprocess.run(
            [config["blkid"], "-c", "/dev/null", "-o", "device", "-t", spec], capture_output=True, text=True
        )
        devices = found.stdout.split()
        return devices[0] if found.returncode == 0 and devices else None
    return spec if os.path.exists(spec) else None


def _mounted_devices() -> set[str]:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as handle:
        return {line.split()[2] for line in handle if len(line.split()) > 2}


def _start(config: dict[str, Any], name: str) -> int:
    variant = config.get("variant", "normal")
    fields = _crypttab_line(config["crypttab"], name)
    if fields is None:
        _say(name, f"failed, not found in {config['crypttab']}")
        return 1
    mapped = os.path.join(config["mapper_dir"], name)
    if os.path.lexists(mapped):
        _say(name, "running")
        return 0
    source = _resolve(config, fields[1])
    if source is None:
        print(f"{name}: Source device {fields[1]} not found", file=sys.stderr)
        _say(name, "failed")
        return 1
    key = fields[2] if len(fields) > 2 else "none"
    if key in ("none", "-"):
        print(f"{name}: the test stand-in cannot ask for a passphrase", file=sys.stderr)
        _say(name, "failed")
        return 1
    _say(name, "starting")
    check = subprocess.run(
        [config["cryptsetup"], "open", "--test-passphrase", "--key-file", key, source],
        capture_output=True,
        text=True,
    )
    if check.returncode != 0:
        for line in check.stderr.splitlines():
            print(f"{name}: {line}", file=sys.stderr)
        _say(name, "failed")
        return 1
    if variant == "maps-nothing":
        _say(name, "started")
        return 0
    os.makedirs(config["mapper_dir"], exist_ok=True)
    os.symlink(config["targets"][name], mapped)
    if variant == "map-then-fail":
        print(f"{name}: failed after mapping (test stand-in)", file=sys.stderr)
        return 1
    _say(name, "started")
    return 0


def _stop(config: dict[str, Any], name: str) -> int:
    variant = config.get("variant", "normal")
    mapped = os.path.join(config["mapper_dir"], name)
    if not os.path.lexists(mapped):
        _say(name, "stopped")
        return 0
    if variant == "stop-fails":
        print(f"{name}: cannot remove the mapping (test stand-in told to fail)", file=sys.stderr)
        _say(name, "failed")
        return 1
    if variant == "stop-leaves-mapping":
        _say(name, "stopping")
        return 0
    info = os.stat(mapped)
    if f"{os.major(info.st_rdev)}:{os.minor(info.st_rdev)}" in _mounted_devices():
        print(f"Device {name} is still in use.", file=sys.stderr)
        _say(name, "busy")
        return 1
    os.unlink(mapped)
    _say(name, "stopping")
    return 0


def main(config: dict[str, Any], argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} <name>", file=sys.stderr)
        status = 1
    elif config["action"] == "start":
        status = _start(config, argv[1])
    else:
        status = _stop(config, argv[1])
    with open(config["log"], "a", encoding="utf-8") as log:
        log.write(json.dumps({"action": config["action"], "argv": argv[1:], "exit": status}) + "\n")
    return status
