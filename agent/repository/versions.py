"""When a file in two snapshots is one version: the test every layout makes true.

In the links layout an unchanged file is the previous snapshot's inode
(a hard link), so one inode number is one version. In the btrfs layout a
snapshot is a clone of the one before, updated in place: a file keeps its
inode number in every snapshot even when its content, mode or owner changed.
What holds in both is the inode's change time: a btrfs snapshot keeps each
inode's ctime as it was, any write, chmod, chown, xattr or ACL change sets
it anew, and a hard link is one inode whose times are the same wherever it
is seen (docs/ARCHITECTURE.md, "The btrfs layout").
"""

from __future__ import annotations

import os


def same_version(a: os.stat_result, b: os.stat_result) -> bool:
    """One version of a file seen in two snapshots: the same inode number, change time, modification time and size."""
    return (a.st_ino, a.st_ctime_ns, a.st_mtime_ns, a.st_size) == (b.st_ino, b.st_ctime_ns, b.st_mtime_ns, b.st_size)


def shares_inodes(a_root: str | bytes, b_root: str | bytes) -> bool:
    """Whether two snapshot trees are on one device, where one inode number is one file (a hard link).

    Each btrfs subvolume is a device of its own; the links layout's
    snapshots share the repository's.
    """
    return os.lstat(a_root).st_dev == os.lstat(b_root).st_dev
