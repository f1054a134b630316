"""Real filesystems on loop devices for tests: made, mounted, and always unmounted again."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

MKFS = {
    "ext4": ["mkfs.ext4", "-q", "-F"],
    "vfat": ["mkfs.vfat"],
    "btrfs": ["mkfs.btrfs", "-q", "-f"],
}
SIZE = {"ext4": 16, "vfat": 16, "btrfs": 120}  # MiB: btrfs wants at least 114


def need_root_and_tools(*kinds: str) -> None:
    """Skip, saying why, where loop mounts of these filesystems cannot be made."""
    if os.geteuid() != 0:
        pytest.skip(reason="needs root to mount loop devices")
    for kind in kinds:
        if shutil.which(MKFS[kind][0]) is None:
            pytest.skip(reason=f"{MKFS[kind][0]} is not installed (scripts/test installs it)")


@contextlib.contextmanager
def mounted(images: Path, kind: str, at: Path) -> Iterator[Path]:
    """A fresh ``kind`` filesystem in an image under ``images``, loop-mounted at ``at`` until the context ends."""
    images.mkdir(parents=True, exist_ok=True)
    image = images / f"{kind}-{len(list(images.iterdir()))}.img"
    with open(image, "wb") as handle:
        handle.truncate(SIZE[kind] * 1024 * 1024)
    subprocess.run([*MKFS[kind], str(image)], check=True, capture_output=True)
    at.mkdir(parents=True, exist_ok=True)
    # -o loop: mount attaches the loop device and detaches it (autoclear) at umount.
    subprocess.run(["mount", "-o", "loop", str(image), str(at)], check=True, capture_output=True)
    try:
        yield at
    finally:
        subprocess.run(["umount", str(at)], check=True, capture_output=True)
        image.unlink()
