"""Manifests, verify, versions and diff for a repository on a server reached over SSH.

What the local commands read from the disk is asked of the server
(agent.repository.remote_read: ``find`` and ``stat -c`` for listings,
``sha256sum`` for checksums, ``cmp`` for contents) and judged here with the
local rules (docs/ARCHITECTURE.md, "Remote repositories"):

- **manifest**: when a remote snapshot completes, the server lists its
  regular files with their inodes; a file whose inode the previous
  snapshot's manifest lists is that file (a hard link ``--link-dest`` made,
  as locally: agent.repository.manifest.shared_line) and keeps its line;
  every other file is hashed on the server. The manifest (format 1: the
  content lines, no ``=`` lines, since attributes are not listed there) is
  uploaded into ``metadata/`` before the snapshot is renamed complete, so
  the server's sync covers it.
- **verify**: the manifest is fetched, the server lists the snapshot's
  files and hashes each distinct inode again; the report is the local one
  (agent.engine.verify).
- **versions** and **diff**: the same Version and Change values as
  agent.engine.history, from the server's stat (times in whole seconds:
  busybox's stat prints no nanoseconds; extended attributes are not read).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import os
import posixpath
import shutil
import tempfile
import time
from typing import Any, Sequence

from agent.core.errors import CommandError, CorruptManifestError, UsageError
from agent.engine import verify as verifier
from agent.engine.history import Change, Snapshot, Version, kind_of, narrow, within
from agent.repository import manifest as manifests
from agent.repository.remote import RemoteRepository, rsync_remote_path, rsync_shell
from agent.repository.remote_read import COPY_MANIFEST, Held, Stat, hashed_tree, held_at, run_bytes, same_contents, sums, tree
from agent.repository.store import IN_PROGRESS, MANIFEST_SUFFIX

log = logging.getLogger(__name__)

FORMAT = 1  # content lines only: the server's listing gives no owners' names nor link targets in bulk
NO_MANIFEST_REMOTE = "not recorded: the repository is remote"  # what snapshots made before remote manifests say


# -- moving manifests ----------------------------------------------------------------


def fetch_manifest(repo: RemoteRepository, name: str, into: str, *, step: str) -> str | None:
    """Copy ``metadata/<name>.manifest`` from the server into the directory ``into``; its local path, None when there is none."""
    target = os.path.join(into, name + MANIFEST_SUFFIX)
    argv = (
        repo.rsync, "--times", f"--max-size={manifests.MAX_MANIFEST_BYTES}", "-e", rsync_shell(repo.remote, repo.ssh),
        rsync_remote_path(repo.remote, "metadata", name + MANIFEST_SUFFIX), target,
    )  # fmt: skip
    result = repo.runner.run(argv, step=step, mutating=False, check=False)
    if result.returncode == 23 and any("No such file or directory" in line for line in result.stderr_tail):
        return None
    if result.returncode != 0:
        raise CommandError(
            f"the manifest of {name} could not be read from {repo.root}: {' | '.join(result.stderr_tail[-2:])}",
            argv=result.argv, returncode=result.returncode, stderr_tail=result.stderr_tail, step=step,
        )  # fmt: skip
    return target if os.path.exists(target) else None


def upload_manifest(repo: RemoteRepository, local: str, name: str, *, step: str) -> None:
    """Put the manifest at ``local`` into ``metadata/<name>.manifest`` on the server (rsync writes beside and renames)."""
    argv = (
        repo.rsync, "--perms", "--chmod=F600", "-e", rsync_shell(repo.remote, repo.ssh),
        local, rsync_remote_path(repo.remote, "metadata", name + MANIFEST_SUFFIX),
    )  # fmt: skip
    result = repo.runner.run(argv, step=step, check=False)
    if result.returncode != 0:
        raise CommandError(
            f"the manifest of {name} could not be written to {repo.root}: {' | '.join(result.stderr_tail[-2:])}",
            argv=result.argv, returncode=result.returncode, stderr_tail=result.stderr_tail, step=step,
        )  # fmt: skip


def render_format1(lines: Sequence[bytes]) -> tuple[bytes, str]:
    """A format-1 manifest from its content lines, and its own digest (pure)."""
    head = b"# backup-agent manifest %d %s\n" % (FORMAT, manifests.ALGORITHM.encode())
    body = b"".join(lines)
    own = f"{manifests.ALGORITHM}:{hashlib.new(manifests.ALGORITHM, head + body).hexdigest()}"
    return head + body + manifests.trailer(len(lines), own), own


def manifest_lines(
    files: dict[bytes, Stat], known: manifests.Known, digests: dict[bytes, str]
) -> tuple[list[bytes], list[bytes], int]:
    """The content lines of a snapshot whose files are ``files``: a line of ``known`` (the previous manifest)
    for a shared inode, else ``digests`` of the first path of its inode (pure).

    Returns the lines, the first path of each inode still to hash (empty when ``digests`` covers them),
    and how many lines were reused.
    """
    lines: list[bytes] = []
    to_hash: list[bytes] = []
    first: dict[int, bytes] = {}
    reused = 0
    for rel in sorted(files):
        info = files[rel]
        start = known.start(info.inode) if manifests.shared_line(known, info.inode) is not None else None
        if start is not None:
            reused += 1
            lines.append(b"%s %d %s\n" % (start, info.inode, manifests.escape_path(rel)))
            continue
        owner = first.setdefault(info.inode, rel)
        digest = digests.get(owner)
        if digest is None:
            if owner == rel:
                to_hash.append(rel)
            continue
        lines.append(manifests.line(digest, info.size, info.inode, rel))
    return lines, to_hash, reused


def unchanged_manifest(
    previous: str | None,
    written: tuple[str | None, frozenset[bytes]] | None,
    metadata: dict[str, Any],
    previous_metadata: dict[str, Any] | None,
    warnings: Sequence[str],
) -> dict[str, Any] | None:
    """What the metadata records when the new snapshot's manifest is the previous one, byte for byte; None when
    it may not be (pure).

    It is when rsync itemized no file written (``written``: the files it wrote, linked against ``previous``
    alone, nothing resumed), created none and transferred none, every file of the source reached the snapshot
    (not partial, no rsync warning) and the source has as many regular files as the previous manifest lists:
    then every file is the previous snapshot's, hard-linked at the same path, with the same inode.
    """
    if previous is None or written is None or written[0] != previous or written[1]:
        return None
    recorded = (previous_metadata or {}).get("manifest")
    statistics = metadata.get("statistics") or {}
    if not isinstance(recorded, dict) or not recorded.get("digest") or recorded.get("format") != FORMAT:
        return None
    failed = metadata.get("vanished") or (metadata.get("errors") or {}).get("count")
    if metadata.get("partial") or metadata.get("resumed_from") or failed or any(str(w).startswith("rsync:") for w in warnings):
        return None
    if statistics.get("transferred_files") != 0 or statistics.get("created_files") != 0:
        return None
    if not isinstance(recorded.get("entries"), int) or statistics.get("regular_files") != recorded["entries"]:
        return None
    return {
        **recorded, "hashed_files": 0, "hashed_bytes": 0, "reused_files": recorded["entries"], "reused_from": previous,
        "hashed_on": "server", "copied": True, "duration": 0.0,
    }  # fmt: skip


def copy_manifest(repo: RemoteRepository, previous: str, name: str, *, step: str = "snapshot") -> bool:
    """Copy ``previous``'s manifest as ``name``'s on the server; False when it is not there (the caller lists and hashes)."""
    data, _ = run_bytes(repo, COPY_MANIFEST, repo.remote.path, previous, name, step=step, ok=(0, 4))
    return data.strip() == b"copied"


def record_manifest(repo: RemoteRepository, name: str, previous: str | None, *, step: str = "snapshot") -> dict[str, Any]:
    """Write the manifest of ``snapshots/<name>.in-progress`` on the server; what the metadata records of it.

    Raises BackupAgentError when something fails (the caller makes it a warning, as locally).
    """
    started = time.monotonic()
    work = tempfile.mkdtemp(prefix="backup-agent-manifest-")
    try:
        known = manifests.Known()
        if previous is not None:
            path = fetch_manifest(repo, previous, work, step=step)
            if path is None:
                log.info("snapshot %s has no manifest: every file of %s is hashed on the server", previous, name)
            else:
                try:
                    known = manifests.reusable(path)
                except (CorruptManifestError, OSError) as exc:
                    log.warning("the manifest of %s is not used (%s): every file of %s is hashed", previous, exc, name)
        directory = repo.remote.at("snapshots", name + IN_PROGRESS)
        complaints: tuple[str, ...] = ()
        unhashed: list[bytes] = []
        if known.lines:
            files = tree(repo, directory, files_only=True, step=step)
            lines, hashed, reused = manifest_lines(files, known, {})
            if hashed:
                digests, complaints = sums(repo, directory, hashed, step=step)
                lines, unhashed, reused = manifest_lines(files, known, digests)
        else:  # nothing to reuse: every file is read anyway, listed and hashed in one call
            both = hashed_tree(repo, directory, step=step)
            files = {rel: info for rel, (info, _) in both.items()}
            hashed = list(files)
            lines, unhashed, reused = manifest_lines(files, known, {rel: d for rel, (_, d) in both.items() if d is not None})
        if unhashed:
            shown = verifier.shown(next(iter(unhashed)))
            raise CommandError(
                f"{len(unhashed)} files could not be hashed on {repo.remote.host} (first: {shown}): {' | '.join(complaints[-2:])}",
                step=step,
            )
        data, own = render_format1(lines)
        local = os.path.join(work, name + MANIFEST_SUFFIX)
        with open(local, "wb") as handle:
            handle.write(data)
        upload_manifest(repo, local, name, step=step)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "algorithm": manifests.ALGORITHM,
        "format": FORMAT,
        "entries": len(lines),
        "digest": own,
        "hashed_files": len(hashed),
        "hashed_bytes": sum(files[rel].size for rel in hashed),
        "reused_files": reused,
        "reused_from": previous,
        "hashed_on": "server",
        "duration": round(time.monotonic() - started, 3),
    }


# -- verify --------------------------------------------------------------------------


def _load(repo: RemoteRepository, name: str, work: str, report: verifier.Report) -> manifests.Manifest | None:
    """The snapshot's manifest from the server, or None with the reason in the report (as verify._load_manifest)."""
    Location = verifier.Location
    recorded = (repo.read_metadata(name) or {}).get("manifest")
    path = fetch_manifest(repo, name, work, step="verify")
    if path is None:
        if isinstance(recorded, dict) and recorded.get("digest"):
            report.problems.append(
                verifier.Problem(verifier.MISSING_MANIFEST, [Location(name, b"")], "the metadata says a manifest was written; the server has none")
            )
        elif isinstance(recorded, dict) and recorded.get("error"):
            report.unchecked[name] = f"no manifest: {recorded['error']}"
        else:
            report.unchecked[name] = "no manifest: made before remote snapshots had one"
        return None
    try:
        loaded = manifests.load(path)
    except CorruptManifestError as exc:
        report.problems.append(verifier.Problem(verifier.CORRUPTED_MANIFEST, [Location(name, b"")], exc.message))
        return None
    if isinstance(recorded, dict) and recorded.get("digest") not in (None, loaded.digest):
        report.problems.append(
            verifier.Problem(verifier.CORRUPTED_MANIFEST, [Location(name, b"")], "it is not the manifest its metadata recorded")
        )
        return None
    return loaded


def verify(repo: RemoteRepository, names: list[str]) -> verifier.Report:
    """Check ``names`` against their manifests, every file hashed again on the server; the local verify's report."""
    started = time.monotonic()
    report = verifier.Report(repo.root)
    work = tempfile.mkdtemp(prefix="backup-agent-verify-")
    # (device, inode) -> digest read now (None: unreadable), across the snapshots checked: each read once.
    read: dict[tuple[int, int], str | None] = {}
    bad: dict[tuple[int, int], list[tuple[str, int, verifier.Location, Stat]]] = {}
    # The server hashes while this side fetches and reads the manifest (one more ssh session on the shared connection).
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="remote-hash")
    try:
        for name in names:
            directory = repo.remote.at("snapshots", name)
            recorded = (repo.read_metadata(name) or {}).get("manifest")
            ahead = None
            if not read and isinstance(recorded, dict) and recorded.get("digest"):
                ahead = pool.submit(hashed_tree, repo, directory, step="verify")
            loaded = _load(repo, name, work, report)
            if loaded is None:
                if ahead is not None:
                    ahead.result()  # its errors are the connection's, as _load's would be
                continue
            hashed_now: dict[bytes, str | None] | None = None
            if not read:  # nothing read yet: the snapshot listed and every file hashed in one call
                both = ahead.result() if ahead is not None else hashed_tree(repo, directory, step="verify")
                present = {rel: info for rel, (info, _) in both.items()}
                hashed_now = {rel: digest for rel, (_, digest) in both.items()}
            else:  # listed, then only the inodes no snapshot checked before holds are hashed
                present = tree(repo, directory, files_only=True, step="verify")
            found: list[verifier.Problem] = []
            to_read: dict[tuple[int, int], bytes] = {}
            for entry in loaded.entries:
                info = present.get(entry.path)
                if info is None:
                    gone = "not in the snapshot (or no longer a regular file)"
                    found.append(verifier.Problem(verifier.MISSING, [verifier.Location(name, entry.path)], gone, entry.digest, None, entry.size))
                    continue
                key = (info.device, info.inode)
                if key not in read and key not in to_read:
                    to_read[key] = entry.path
            if hashed_now is not None:
                digests = {rel: digest for rel, digest in hashed_now.items() if digest is not None}
            else:
                digests, _ = sums(repo, directory, to_read.values(), step="verify") if to_read else ({}, ())
            for key, rel in to_read.items():
                read[key] = digests.get(rel)
                report.inodes += 1
                report.bytes += present[rel].size
            listed = set()
            for entry in loaded.entries:
                listed.add(entry.path)
                info = present.get(entry.path)
                if info is None:
                    continue
                report.files += 1
                key = (info.device, info.inode)
                if read[key] != entry.digest:
                    bad.setdefault(key, []).append((entry.digest, entry.size, verifier.Location(name, entry.path), info))
            for path in sorted(set(present) - listed):
                unlisted = "in the snapshot but not in its manifest: nothing to check it against"
                found.append(verifier.Problem(verifier.UNLISTED, [verifier.Location(name, path)], unlisted))
            report.problems += found
            report.checked.append(name)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(work, ignore_errors=True)
    for key, places in sorted(bad.items(), key=lambda item: item[1][0][2].path):
        expected, expected_size, _, now = places[0]
        locations = [where for _, _, where, _ in places]
        if read[key] is None:
            report.problems.append(
                verifier.Problem(verifier.UNREADABLE, locations, "cannot be read on the server", expected, None, expected_size)
            )
            continue
        if now.size != expected_size:
            detail = f"size {now.size}, was {expected_size}" + (" (truncated)" if now.size < expected_size else "")
        else:
            detail = "content differs from the checksum recorded when it was backed up"
        report.problems.append(verifier.Problem(verifier.DAMAGED, locations, detail, expected, read[key], expected_size, now.size))
    report.problems.sort(key=lambda p: verifier.KINDS.index(p.kind))
    report.seconds = time.monotonic() - started
    return report


# -- versions ------------------------------------------------------------------------


def _signature(held: Held) -> tuple[int, int, int, frozenset[tuple[bytes, int]]]:
    own = held.stat
    members = frozenset((name, -1 if info.is_dir else info.inode) for name, info in held.entries)
    return (own.mode & 0o7777, own.uid, own.gid, members)


def build_versions(history: Sequence[Snapshot], found: dict[str, Held]) -> list[Version]:
    """history.versions from what the server said each snapshot holds (``found``: snapshot name -> Held) (pure)."""
    versions: list[Version] = []
    previous_key: object = None
    previous_signature: tuple[int, int, int, frozenset[tuple[bytes, int]]] | None = None
    for snap in history:
        held = found.get(snap.name)
        if held is None:
            previous_key, previous_signature = None, None
            continue
        info = held.stat
        kind = kind_of(info.mode)
        signature = _signature(held) if kind == "directory" else None
        key: object = ("directory", signature) if signature is not None else (kind, info.inode, info.ctime, info.mtime, info.size)
        if versions and key == previous_key:
            current = versions[-1]
            current.last = snap.name
            current.snapshots.append(snap.name)
        else:
            current = Version(
                kind=kind, first=snap.name, last=snap.name, snapshots=[snap.name],
                size=info.size if kind != "directory" else sum(e.size for _, e in held.entries if e.is_file),
                mtime_ns=info.mtime * 1_000_000_000, mode=info.mode & 0o7777, uid=info.uid, gid=info.gid, inode=info.inode,
                target=os.fsdecode(held.target) if held.target is not None else None,
            )  # fmt: skip
            if signature is not None:
                current.entries = len(signature[3])
                if previous_signature is not None:
                    old, new = dict(previous_signature[3]), dict(signature[3])
                    current.added = sorted(os.fsdecode(n) for n in set(new) - set(old))
                    current.removed = sorted(os.fsdecode(n) for n in set(old) - set(new))
                    current.replaced = sorted(os.fsdecode(n) for n in set(old) & set(new) if old[n] != new[n])
            versions.append(current)
        if snap.partial:
            current.partial.append(snap.name)
        previous_key, previous_signature = key, signature
    return versions


def versions(repo: RemoteRepository, history: Sequence[Snapshot], path: str) -> list[Version]:
    """Every version of ``path`` in a remote repository, oldest first (one ssh call); empty when none holds it."""
    narrowed = narrow(history, path)
    by_rel: dict[str, list[str]] = {}
    for snap in narrowed:
        rel = within(snap.source, path)
        if rel is not None:
            by_rel.setdefault(rel, []).append(snap.name)
    found: dict[str, Held] = {}
    for rel, names in by_rel.items():
        found.update((held.snapshot, held) for held in held_at(repo, rel, names, step="versions"))
    return build_versions(narrowed, found)


def not_held(repo: RemoteRepository, history: Sequence[Snapshot], path: str) -> UsageError:
    """The error for a path no remote snapshot holds."""
    if not history:
        return UsageError(f"{path}: {repo.root} holds no snapshot yet")
    if all(within(snap.source, path) is None for snap in history):
        sources = ", ".join(sorted({snap.source for snap in history}))
        return UsageError(f"{path} is outside what was backed up ({sources}): give a path below it")
    return UsageError(f"no snapshot in {repo.root} holds {path}: `backup-agent versions` of a directory above it shows what it held")


# -- diff ----------------------------------------------------------------------------


def _size(info: Stat) -> int | None:
    return None if info.is_dir else info.size


def plan_diff(a: dict[bytes, Stat], b: dict[bytes, Stat]) -> tuple[list[Change], list[bytes]]:
    """What differs from listing ``a`` to listing ``b`` as far as stat tells, and the paths whose contents must be
    compared (same type and size, another inode) (pure)."""
    out: list[Change] = []
    to_compare: list[bytes] = []
    for rel in a.keys() | b.keys():
        shown = os.fsdecode(rel)
        ia, ib = a.get(rel), b.get(rel)
        if ib is None and ia is not None:
            out.append(Change(shown, "removed", kind_of(ia.mode), _size(ia), None))
        elif ia is None and ib is not None:
            out.append(Change(shown, "added", kind_of(ib.mode), None, _size(ib)))
        elif ia is not None and ib is not None:
            if ia.is_dir and ib.is_dir:
                if (ia.mode & 0o7777, ia.uid, ia.gid) != (ib.mode & 0o7777, ib.uid, ib.gid):
                    out.append(Change(shown, "changed", "directory", what="metadata"))
            elif kind_of(ia.mode) != kind_of(ib.mode) or (ia.mode & 0o170000) != (ib.mode & 0o170000):
                out.append(Change(shown, "changed", kind_of(ib.mode), _size(ia), _size(ib), "type"))
            elif (ia.device, ia.inode) == (ib.device, ib.inode):
                continue
            elif ia.size != ib.size:
                out.append(Change(shown, "changed", kind_of(ib.mode), ia.size, ib.size, "content"))
            elif ia.is_file or ia.is_link:
                to_compare.append(rel)
            elif (ia.mode, ia.uid, ia.gid, ia.mtime) != (ib.mode, ib.uid, ib.gid, ib.mtime):
                out.append(Change(shown, "changed", kind_of(ib.mode), ia.size, ib.size, "metadata"))
    return out, to_compare


def finish_diff(a: dict[bytes, Stat], b: dict[bytes, Stat], found: list[Change], same: dict[bytes, bool]) -> list[Change]:
    """The plan's changes with the compared paths judged: content, else metadata when mode, owner or mtime differ (pure)."""
    out = list(found)
    for rel, equal in same.items():
        ia, ib = a[rel], b[rel]
        if not equal:
            out.append(Change(os.fsdecode(rel), "changed", kind_of(ib.mode), ia.size, ib.size, "content"))
        elif (ia.mode, ia.uid, ia.gid, ia.mtime) != (ib.mode, ib.uid, ib.gid, ib.mtime):
            out.append(Change(os.fsdecode(rel), "changed", kind_of(ib.mode), ia.size, ib.size, "metadata"))
    return sorted(out, key=lambda c: c.path)


def diff(repo: RemoteRepository, a: Snapshot, b: Snapshot) -> list[Change]:
    """What differs from snapshot ``a`` to ``b`` on the server: two listings, and cmp for the files stat cannot tell."""
    if posixpath.normpath(a.source) != posixpath.normpath(b.source):
        raise UsageError(f"{a.name} and {b.name} are backups of different sources ({a.source}, {b.source}): nothing to compare")
    listed_a = tree(repo, a.path, files_only=False, step="diff")
    listed_b = tree(repo, b.path, files_only=False, step="diff")
    found, to_compare = plan_diff(listed_a, listed_b)
    same = same_contents(repo, a.path, b.path, to_compare, step="diff") if to_compare else {}
    return finish_diff(listed_a, listed_b, found, same)
