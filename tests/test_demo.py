"""scripts/demo end to end, as someone trying a fresh clone runs it.

The demo is the README's promise: it must run, and its restore walk-through
must show what it says (a deleted file restored equal, a directory put back
in place, verify intact, then verify finding a byte that rotted on the disk
image and exiting 11). Everything is real: the demo's own loop device, ext4
image, rsync and the CLI. Its temporary directory goes under this test's
tmp_path (TMPDIR), so whatever it leaves mounted or attached is found.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from agent.core.mounts import read_mountinfo
from tests.conftest import REPO
from tests.test_disk import _require_parts, _within

pytestmark = [pytest.mark.integration, pytest.mark.root]

DEMO = REPO / "scripts" / "demo"
WORK_PATTERN = "backup-agent-demo.*"


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "TMPDIR": str(tmp_path)}


def _leftovers(directory: Path) -> list[str]:
    """Mounts under directory, and loop devices whose image lies under it."""
    found = [entry.mount_point for entry in read_mountinfo() if _within(entry.mount_point, directory)]
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            image = backing.read_text().strip()
        except FileNotFoundError:  # detached meanwhile
            continue
        if _within(image, directory):
            found.append(f"{backing.parent.parent.name}: {image}")
    return found


def test_the_demo_runs_its_restore_walk_through_on_a_file_backed_disk(tmp_path: Path) -> None:
    _require_parts("debugfs", "dumpe2fs")
    result = subprocess.run(
        [str(DEMO)], env=_env(tmp_path), cwd="/", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=180
    )
    output = result.stdout
    assert result.returncode == 0, output
    assert "the backup disk: an ext4 filesystem in disk.img" in output, output
    snapshots = re.findall(r"^made snapshot (\S+):", output, re.MULTILINE)
    assert len(snapshots) == 2, output
    first, second = snapshots

    assert re.search(r"/source/documents/report\.txt: 2 versions in 2 snapshots$", output, re.MULTILINE), output
    assert re.search(r"/source/photos/cat\.jpg: 1 version in 2 snapshots$", output, re.MULTILINE), output
    assert f"{first} -> {second}\n" in output
    assert "1 added, 1 removed, 2 changed" in output
    assert f"/source/photos/restored-{first}/cat.jpg\n" in output
    assert "restored content equals the deleted photo's" in output
    assert re.search(r"moved the current \S+/source/documents aside to \S+/source/documents\.before-restore-", output), output
    assert "source/documents/report.txt: draft 1" in output
    assert "intact: 2 snapshots" in output

    # The byte was flipped in disk.img, located through ext4's block map, and
    # read back through the mounted filesystem without an I/O error.
    assert re.search(r"photos/holiday\.jpg: byte 1000000 is in filesystem block \d+ \(\d+-byte blocks\), byte \d+ of disk\.img", output), output
    assert "differ: byte 1000001" in output
    assert "DAMAGE FOUND in " in output
    assert f"damaged: photos/holiday.jpg (in 2 snapshots: {first}, {second}): content differs" in output
    assert "unreadable" not in output
    assert output.rstrip().endswith("(removed at exit; pass --keep to keep it)"), output
    assert re.search(r"^exit status 11$", output, re.MULTILINE), output

    assert list(tmp_path.glob(WORK_PATTERN)) == []
    assert _leftovers(tmp_path) == []


def test_an_interrupted_demo_unmounts_and_detaches_its_disk(tmp_path: Path) -> None:
    """SIGTERM while the image is mounted: the trap unmounts and detaches; --keep keeps the files."""
    _require_parts("debugfs", "dumpe2fs")
    process = subprocess.Popen(
        [str(DEMO), "--keep"], env=_env(tmp_path), cwd="/", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert process.stdout is not None
    seen: list[str] = []
    try:
        for line in process.stdout:
            seen.append(line)
            if "== the snapshots" in line:
                break
        mounted_then = _leftovers(tmp_path)
        process.send_signal(signal.SIGTERM)
        seen.append(process.stdout.read())
        status = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = "".join(seen)
    assert any(line.startswith("loop") for line in mounted_then), output
    assert len(mounted_then) == 2, mounted_then  # the mount and its loop device
    assert status == 128 + signal.SIGTERM, output
    assert _leftovers(tmp_path) == []
    (work,) = tmp_path.glob(WORK_PATTERN)
    assert (work / "disk.img").is_file()
    assert not any((work / "disk").iterdir())  # the mount point, empty once unmounted
