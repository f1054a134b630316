"""Unfinished transfers: at most one, folded together, and what each holds.

A stopped or failed transfer leaves ``<name>.in-progress``; the next run
gives it to rsync as a second ``--link-dest``, so nothing it copied is sent
again. Kept side by side, each stopped run would add one more, and a disk
fills with copies nobody asked for. So when a run ends without a complete
transfer, the older unfinished transfer is *folded* into the new one: every
entry the new one lacks is hard-linked into it from the older (no data is
copied, no existing entry is replaced), and the older one is deleted. The
new one then holds everything either had, as link-dest material only: it
is never completed, since its metadata never says "transferred" (the
README's "backup" section says so for users).

Nothing here follows a symbolic link: the disk is removable and what it
holds is not trusted. Directories are walked by descriptor (``O_NOFOLLOW``),
entries are linked with ``follow_symlinks=False`` relative to those
descriptors, so a link planted in either tree leads nowhere outside it.
"""

from __future__ import annotations

import os
import stat

_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def fold(older: str, newer: str) -> int:
    """Hard-link into ``newer`` every entry of ``older`` that ``newer`` lacks; the number linked.

    Directories that ``newer`` lacks are made (mode 0700: only root reads an
    unfinished transfer) and filled the same way. Both must be directories
    on one filesystem.
    """
    source = os.open(older, _DIRECTORY_FLAGS)
    try:
        target = os.open(newer, _DIRECTORY_FLAGS)
        try:
            return _fold(source, target)
        finally:
            os.close(target)
    finally:
        os.close(source)


def _fold(source: int, target: int) -> int:
    linked = 0
    have = set(os.listdir(target))
    for entry in os.scandir(source):
        name = entry.name
        if entry.is_dir(follow_symlinks=False):
            if name not in have:
                os.mkdir(name, 0o700, dir_fd=target)
            try:
                inner_target = os.open(name, _DIRECTORY_FLAGS, dir_fd=target)
            except OSError:
                continue  # the newer one has something else by that name: it wins
            try:
                inner_source = os.open(name, _DIRECTORY_FLAGS, dir_fd=source)
                try:
                    linked += _fold(inner_source, inner_target)
                finally:
                    os.close(inner_source)
            finally:
                os.close(inner_target)
        elif name not in have:
            os.link(name, name, src_dir_fd=source, dst_dir_fd=target, follow_symlinks=False)
            linked += 1
    return linked


def own_bytes(path: str) -> int:
    """The space ``path`` holds that nothing outside it shares: files linked nowhere else, and directories.

    A file hard-linked from a snapshot costs nothing of its own; deleting
    the tree frees about this much.
    """
    total = 0
    counted: dict[int, int] = {}  # inode -> links seen inside the tree
    sizes: dict[int, tuple[int, int]] = {}  # inode -> (links, bytes)
    stack = [path]
    while stack:
        current = stack.pop()
        try:
            entries = list(os.scandir(current))
        except OSError:
            continue
        for entry in entries:
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(info.st_mode):
                total += info.st_blocks * 512
                stack.append(entry.path)
                continue
            counted[info.st_ino] = counted.get(info.st_ino, 0) + 1
            sizes[info.st_ino] = (info.st_nlink, info.st_blocks * 512)
    for inode, seen in counted.items():
        links, size = sizes[inode]
        if seen >= links:
            total += size
    return total
