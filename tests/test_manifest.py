"""Manifests of content checksums, written by the real cycle with the real rsync.

The manifest is compared with an independent hashlib walk of the snapshot.
That files shared with the previous snapshot are not read again is shown
without mocks: a shared file is damaged in place in the previous snapshot
(size and time kept, so rsync links it again), and the new manifest still
carries the checksum of what was backed up, which it could only have taken
from the previous manifest; the byte counts the step reports agree.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.repository import manifest as manifests
from agent.cli import main
from agent.core.errors import EXIT_PARTIAL, CorruptManifestError
from tests.test_cycle_robustness import (  # noqa: F401  (cli is a fixture)
    Cli,
    cli,
    events,
    install_stand_in,
    make_fake_rsync,
    step_event,
    write_config,
)

pytestmark = pytest.mark.integration

BIG = 3 * manifests.READ_SIZE + 12345  # several reads


# -- helpers shared with tests/test_verify.py ----------------------------------------


def build_source(root: Path) -> None:
    """Names a manifest must survive, a hard-linked pair, an empty and a big file, a symlink."""
    root.mkdir()
    (root / "plain.txt").write_text("plain\n")
    (root / "name with spaces").write_text("spaces\n")
    (root / "line\nbreak").write_text("newline in name\n")
    (root / "back\\slash").write_text("backslash in name\n")
    (root / "empty").write_bytes(b"")
    os.makedirs(os.fsencode(root) + b"/bytes-\xff\xfe-dir")
    with open(os.fsencode(root) + b"/bytes-\xff\xfe-dir/\xe9t\xe9", "wb") as handle:
        handle.write(b"not utf-8 name\n")
    (root / "deep" / "er").mkdir(parents=True)
    (root / "deep" / "er" / "big.bin").write_bytes(os.urandom(BIG))
    (root / "hard-a").write_text("shared inode\n")
    os.link(root / "hard-a", root / "deep" / "hard-b")
    os.symlink("plain.txt", root / "link-to-plain")
    (root / "empty-dir").mkdir()
    for index in range(20):
        (root / "deep" / f"f{index:02d}.txt").write_text(f"file {index}\n" * (index + 1))


def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text('[backup]\nionice = "none"\nnice = 0\n[rotation]\nhourly = "always"\n')
    return path


def backup(source: Path, repo: Path, cfg: Path) -> str:
    """One real backup through the CLI; the new snapshot's name."""
    assert main(["backup", "--no-sudo", "-q", "--config", str(cfg), str(source), str(repo)]) == 0
    return os.readlink(repo / "latest").split("/")[-1]


def metadata(repo: Path, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((repo / "metadata" / f"{name}.json").read_text())
    return data


def manifest_path(repo: Path, name: str) -> Path:
    return repo / "metadata" / f"{name}.manifest"


def independent_digests(root: Path) -> dict[bytes, str]:
    """Relative path -> sha256 of every regular file, by os.walk and hashlib alone."""
    top = os.fsencode(root)
    found: dict[bytes, str] = {}
    for directory, _dirs, files in os.walk(top):
        for name in files:
            path = os.path.join(directory, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                with open(path, "rb") as handle:
                    found[os.path.relpath(path, top)] = hashlib.sha256(handle.read()).hexdigest()
    return found


def recorded(repo: Path, name: str) -> dict[bytes, str]:
    loaded = manifests.load(str(manifest_path(repo, name)))
    assert loaded.algorithm == "sha256"
    return {entry.path: entry.digest for entry in loaded.entries}


def same_size_damage(path: Path) -> None:
    """Flip the first byte in place, keeping the inode, size and times (what bit rot looks like)."""
    info = os.lstat(path)
    with open(path, "r+b") as handle:
        first = handle.read(1)
        handle.seek(0)
        handle.write(bytes([first[0] ^ 0xFF]))
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))


# -- the format (pure) -----------------------------------------------------------------


paths = st.binary(min_size=1, max_size=40).filter(lambda p: b"\0" not in p)


@given(path=paths)
def test_any_path_survives_escaping(path: bytes) -> None:
    escaped = manifests.escape_path(path)
    assert b"\n" not in escaped
    assert manifests.unescape_path(escaped) == path


@given(entries=st.lists(st.tuples(paths, st.integers(0, 2**40), st.integers(1, 2**63)), max_size=20))
def test_render_and_parse_agree(entries: list[tuple[bytes, int, int]]) -> None:
    body = b"".join(manifests.line(hashlib.sha256(p).hexdigest(), size, inode, p) for p, size, inode in entries)
    data, digest = manifests.render(body, len(entries))
    parsed = manifests.parse(data, "m")
    assert [(e.path, e.size, e.inode) for e in parsed.entries] == entries
    assert parsed.digest == digest == "sha256:" + hashlib.sha256(data[: data.rindex(b"# end ")]).hexdigest()


@given(data=st.data())
def test_any_flipped_byte_or_cut_makes_the_manifest_corrupt(data: st.DataObject) -> None:
    body = b"".join(manifests.line(hashlib.sha256(b"%d" % i).hexdigest(), i, i + 10, b"dir/f%d" % i) for i in range(5))
    whole, _ = manifests.render(body, 5)
    position = data.draw(st.integers(0, len(whole) - 1))
    flipped = bytearray(whole)
    flipped[position] ^= data.draw(st.integers(1, 255))
    with pytest.raises(CorruptManifestError):
        manifests.parse(bytes(flipped), "m")
    with pytest.raises(CorruptManifestError):
        manifests.parse(whole[: data.draw(st.integers(0, len(whole) - 1))], "m")


@given(entries=st.lists(st.tuples(paths, st.integers(0, 2**40), st.integers(1, 2**63)), max_size=20))
def test_what_the_next_snapshot_reuses_is_what_parse_reads(entries: list[tuple[bytes, int, int]]) -> None:
    body = b"".join(manifests.line(hashlib.sha256(p).hexdigest(), size, inode, p) for p, size, inode in entries)
    data, _ = manifests.render(body, len(entries))
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "m")
        Path(path).write_bytes(data)
        known = manifests.reusable(path)
    # The last line of an inode wins in both (a hard link is listed once per name, with one checksum).
    expected = {e.inode: b"%s %d" % (e.digest.encode(), e.size) for e in manifests.parse(data, "m").entries}
    assert {inode: known.start(inode) for inode in known.lines} == expected
    assert all(known.owner(inode) is None for inode in known.lines)  # format 1 lines: no owner recorded


def test_reuse_refuses_a_corrupt_manifest_and_skips_another_algorithm(tmp_path: Path) -> None:
    body = b"".join(manifests.line(hashlib.sha256(b"%d" % i).hexdigest(), i, i + 10, b"f%d" % i) for i in range(5))
    whole, _ = manifests.render(body, 5)
    damaged = tmp_path / "damaged"
    damaged.write_bytes(whole.replace(b"f3", b"f4"))
    with pytest.raises(CorruptManifestError, match="does not match its own checksum"):
        manifests.reusable(str(damaged))
    other = tmp_path / "other"
    other.write_bytes(manifests.render(body, 5, "sha512")[0])
    assert manifests.reusable(str(other)).lines == {}


# -- through the real cycle ---------------------------------------------------------------


def test_manifest_equals_an_independent_hash_of_the_snapshot(tmp_path: Path, rsync_path: str) -> None:
    source, repo, cfg = tmp_path / "source", tmp_path / "repo", config(tmp_path)
    build_source(source)
    name = backup(source, repo, cfg)
    expected = independent_digests(repo / "snapshots" / name)
    assert recorded(repo, name) == expected
    assert len(expected) == 29 and b"line\nbreak" in expected and b"bytes-\xff\xfe-dir/\xe9t\xe9" in expected
    info = metadata(repo, name)["manifest"]
    # The hard-linked pair is one inode: read once.
    assert (info["entries"], info["hashed_files"], info["reused_files"], info["reused_from"]) == (29, 28, 1, None)
    assert info["digest"] == manifests.load(str(manifest_path(repo, name))).digest


def test_files_shared_with_the_previous_snapshot_are_not_read_again(tmp_path: Path, rsync_path: str) -> None:
    source, repo, cfg = tmp_path / "source", tmp_path / "repo", config(tmp_path)
    build_source(source)
    first = backup(source, repo, cfg)
    original = recorded(repo, first)
    # Damage the big file inside the first snapshot. rsync's quick check
    # (size and time) still links it into the next snapshot; a manifest that
    # read it would record the damaged content's checksum.
    shared = repo / "snapshots" / first / "deep" / "er" / "big.bin"
    same_size_damage(shared)
    changed = source / "deep" / "f03.txt"
    changed.write_text("changed, and longer than before\n")
    second = backup(source, repo, cfg)
    assert os.lstat(repo / "snapshots" / second / "deep" / "er" / "big.bin").st_ino == os.lstat(shared).st_ino

    now = recorded(repo, second)
    assert now[b"deep/er/big.bin"] == original[b"deep/er/big.bin"]
    assert now[b"deep/er/big.bin"] != independent_digests(repo / "snapshots" / second)[b"deep/er/big.bin"]
    assert now[b"deep/f03.txt"] == hashlib.sha256(changed.read_bytes()).hexdigest()
    assert {k: v for k, v in now.items() if k != b"deep/er/big.bin"} == {
        k: v for k, v in independent_digests(repo / "snapshots" / second).items() if k != b"deep/er/big.bin"
    }
    info = metadata(repo, second)["manifest"]
    assert (info["hashed_files"], info["hashed_bytes"]) == (1, changed.stat().st_size)
    assert (info["reused_files"], info["reused_from"]) == (28, first)


def test_without_a_usable_previous_manifest_everything_is_hashed(tmp_path: Path, rsync_path: str) -> None:
    source, repo, cfg = tmp_path / "source", tmp_path / "repo", config(tmp_path)
    build_source(source)
    first = backup(source, repo, cfg)
    manifest_path(repo, first).unlink()  # as a snapshot made before manifests existed
    second = backup(source, repo, cfg)
    assert metadata(repo, second)["manifest"]["hashed_files"] == 28
    # A corrupted previous manifest is not trusted either.
    text = manifest_path(repo, second).read_bytes()
    manifest_path(repo, second).write_bytes(text.replace(b"deep/f01.txt", b"deep/f01.txX"))
    third = backup(source, repo, cfg)
    info = metadata(repo, third)["manifest"]
    assert (info["hashed_files"], info["reused_from"]) == (28, None)
    assert recorded(repo, third) == independent_digests(repo / "snapshots" / third)


def test_a_manifest_that_cannot_be_written_does_not_lose_the_snapshot(tmp_path: Path, rsync_path: str) -> None:
    """-b then -s: between them, a directory takes the manifest's place, so writing it fails for real."""
    source, repo, cfg = tmp_path / "source", tmp_path / "repo", config(tmp_path)
    build_source(source)
    base = ["backup", "--no-sudo", "-q", "--config", str(cfg)]
    assert main([*base, "-b", str(source), str(repo)]) == 0
    (pending,) = [p.name.removesuffix(".in-progress") for p in (repo / "snapshots").iterdir()]
    manifest_path(repo, pending).mkdir()
    assert main([*base, "-s", "--json", str(source), str(repo)]) == 0
    assert os.readlink(repo / "latest") == f"snapshots/{pending}"
    info = metadata(repo, pending)
    assert info["state"] == "complete" and "Is a directory" in info["manifest"]["error"]
    assert any("completed without a manifest" in w for w in info["warnings"])


def test_a_partial_snapshot_gets_a_manifest_of_what_it_holds(
    cli: Cli, tmp_path: Path, trusted_dir: Path, rsync_path: str
) -> None:
    """rsync exits 23 (the stand-in at the process boundary copies with the real rsync first)."""
    source, repo = tmp_path / "source", tmp_path / "repo"
    build_source(source)
    make_fake_rsync(tmp_path, exit=23, stderr=['rsync: [sender] send_files failed to open "/x": Permission denied (13)'])
    cfg = write_config(tmp_path / "fake.toml", rsync=install_stand_in(trusted_dir))
    result = cli.run("backup", "--no-sudo", "-q", "--json", "--config", cfg, source, repo)
    assert result.returncode == EXIT_PARTIAL, result.stderr
    done = step_event(events(result.stdout), "snapshot", "done")
    assert done["partial"] is True and done["manifest"]["entries"] == 29
    name = done["snapshot"]
    assert recorded(repo, name) == independent_digests(repo / "snapshots" / name)


def test_a_dry_run_writes_no_manifest(tmp_path: Path, rsync_path: str) -> None:
    source, repo, cfg = tmp_path / "source", tmp_path / "repo", config(tmp_path)
    build_source(source)
    first = backup(source, repo, cfg)
    before = sorted(os.listdir(repo / "metadata"))
    (source / "new.txt").write_text("new\n")
    assert main(["backup", "--no-sudo", "-q", "-n", "--config", str(cfg), str(source), str(repo)]) == 0
    assert sorted(os.listdir(repo / "metadata")) == before == [f"{first}.json", f"{first}.manifest"]


def test_rotation_deletes_a_snapshots_manifest_with_it(tmp_path: Path, rsync_path: str) -> None:
    source, repo, cfg = tmp_path / "source", tmp_path / "repo", config(tmp_path)
    build_source(source)
    first = backup(source, repo, cfg)
    backup(source, repo, cfg)
    assert main(["rotate", "--config", str(cfg), "--hourly", "1", "--prefer-recent", str(repo)]) == 0
    assert not (repo / "snapshots" / first).exists()
    assert not manifest_path(repo, first).exists() and not (repo / "metadata" / f"{first}.json").exists()


# -- reuse without the cycle: record() twice over one tree (the same inodes, as --link-dest leaves them) ---------


def record_twice(root: Path, tmp_path: Path, edit: Any = None) -> tuple[bytes, bytes, manifests.Recorded]:
    """The manifest of ``root``, then ``root``'s manifest again reusing the first (after ``edit`` of its bytes)."""
    first, second = str(tmp_path / "first.manifest"), str(tmp_path / "second.manifest")
    manifests.record(str(root), first, manifests.Known())
    before = Path(first).read_bytes()
    if edit is not None:
        body = edit(before[before.index(b"\n") + 1 : before.rindex(b"# end ")])
        entries = sum(1 for line in body.split(b"\n")[:-1] if not line.startswith(b"= "))
        Path(first).write_bytes(manifests.render(body, entries)[0])
    again = manifests.record(str(root), second, manifests.reusable(first))
    return Path(first).read_bytes(), Path(second).read_bytes(), again


def test_a_tree_shared_whole_gets_the_same_manifest_without_reading_a_file(tmp_path: Path) -> None:
    build_source(tmp_path / "tree")
    first, second, again = record_twice(tmp_path / "tree", tmp_path)
    assert second == first  # every line the same, in the same order, and so the same trailer
    assert (again.hashed_files, again.reused_files, again.entries) == (0, 29, 29)  # a hard-linked pair is two
    assert manifests.parse(second, "m").attributes == manifests.parse(first, "m").attributes


def test_reuse_takes_a_files_owner_only_from_an_attribute_line_that_agrees(tmp_path: Path) -> None:
    """A previous manifest whose ``=`` line of a file disagrees with its content line (another size, as a
    hostile disk may hold) gives the checksum, but the owner is read from the snapshot, not copied."""
    tree = tmp_path / "tree"
    build_source(tree)
    os.chmod(tree / "plain.txt", 0o640)
    size = (tree / "plain.txt").stat().st_size

    def lie(body: bytes) -> bytes:
        return body.replace(b" f 640 0 0 %d - plain.txt\n" % size, b" f 777 0 0 %d - plain.txt\n" % (size + 1))

    first, second, again = record_twice(tree, tmp_path, lie)
    assert b" f 777 0 0 %d - plain.txt\n" % (size + 1) in first
    written = {a.path: a for a in manifests.parse(second, "m").attributes}
    ours = os.lstat(tree / "plain.txt")
    assert (written[b"plain.txt"].mode, written[b"plain.txt"].uid, written[b"plain.txt"].size) == (0o640, ours.st_uid, size)
    assert again.hashed_files == 0  # the checksum is still the previous one's


def test_known_gives_the_start_and_owner_of_every_file(tmp_path: Path) -> None:
    build_source(tmp_path / "tree")
    first, _, _ = record_twice(tmp_path / "tree", tmp_path)
    known = manifests.reusable(str(tmp_path / "first.manifest"))
    loaded = manifests.parse(first, "m")
    owners = {a.inode: b"%o %d %d" % (a.mode, a.uid, a.gid) for a in loaded.attributes if a.type == "f"}
    assert {inode: known.start(inode) for inode in known.lines} == {
        e.inode: b"%s %d" % (e.digest.encode(), e.size) for e in loaded.entries
    }
    assert {inode: known.owner(inode) for inode in known.lines} == owners
    assert known.start(1) is None and known.owner(1) is None


def test_the_previous_manifest_is_read_while_rsync_runs(tmp_path: Path, rsync_path: str) -> None:
    """Reading the previous manifest costs no time of its own: strace shows another thread open it before rsync
    ends (the old code read it in the main thread, in the snapshot step, after rsync's exit)."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip(reason="strace is not installed: run scripts/test, which installs it")
    source, repo, cfg = tmp_path / "source", tmp_path / "repo", config(tmp_path)
    build_source(source)
    for index in range(300):  # enough files that rsync runs for a while
        (source / "deep" / f"more-{index}").write_text(f"{index}\n")
    first = backup(source, repo, cfg)
    log = tmp_path / "strace.log"
    result = subprocess.run(
        [strace, "-f", "-q", "-s", "300", "-o", str(log), "-e", "trace=openat,execve",
         sys.executable, "-m", "agent.cli", "backup", "--no-sudo", "-q", "--config", str(cfg), str(source), str(repo)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = log.read_text().splitlines()
    main_pid = lines[0].split()[0]
    started = next(i for i, line in enumerate(lines) if re.match(r'\d+\s+execve\("[^"]*rsync"', line))
    pid = lines[started].split()[0]
    ended = next(i for i, line in enumerate(lines) if re.match(rf"{pid}\s+\+\+\+ exited with 0 \+\+\+", line))
    read = [i for i, line in enumerate(lines)
            if "openat(" in line and f"{first}.manifest" in line and line.split()[0] != main_pid]
    assert read and read[0] < ended, "\n".join(line for line in lines if ".manifest" in line or "exited" in line)
    assert metadata(repo, os.readlink(repo / "latest").split("/")[-1])["manifest"]["reused_from"] == first


def test_a_failed_transfer_waits_for_the_manifest_read_beside_it(tmp_path: Path, rsync_path: str) -> None:
    """The previous manifest is read by a thread beside rsync and holds its file open: when rsync fails, the
    cycle waits for that read to end before it unwinds (on a disk, before unmounting), so none outlives it."""
    source, repo, cfg = tmp_path / "source", tmp_path / "repo", config(tmp_path)
    build_source(source)
    first = backup(source, repo, cfg)
    count = 200_000  # a manifest that takes a while to read, beside an rsync that fails at once
    body = b"".join(manifests.line("0" * 64, index, 10**9 + index, b"f%d" % index) for index in range(count))
    manifest_path(repo, first).write_bytes(manifests.render(body, count)[0])
    failing = write_config(tmp_path / "failing.toml", rsync=shutil.which("false"))
    assert main(["backup", "--no-sudo", "-q", "--config", str(failing), str(source), str(repo)]) != 0
    assert [t.name for t in threading.enumerate() if t.name.startswith("manifest")] == []
