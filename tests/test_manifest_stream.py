"""The manifest of a received snapshot, made from its parent's and the send stream (agent.repository.manifest_stream).

The pure parts (reading the stream's dump, finding a path's lines) are
tested directly. The rest sends real subvolumes with real btrfs send and
receive on the session's loop-mounted btrfs, and checks the manifest made
from the stream against the one a full walk of the same snapshot makes:
changed, new, deleted, renamed (a file and a directory) and hard-linked
files, a mode-only and an xattr-only change; then that a stream that
changed nothing gives the parent's manifest byte for byte, and that verify
passes on such a snapshot and catches a file changed in it afterwards.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from agent.cli import main
from agent.engine.send import changes_from_dump
from agent.repository import manifest as manifests
from agent.repository.manifest_stream import find_lines

FAST_SEND = '[backup]\nionice = "none"\nnice = 0\nmethod = "send"\n[rotation]\nhourly = "always"\n'

DUMP = r"""snapshot        ./new.in-progress                uuid=1 transid=9 parent_uuid=2 parent_transid=8
utimes          ./new.in-progress/.backup-agent-send/x    atime=2026-12-05T08:54:23+0000 mtime=2026-12-05T08:54:23+0000
rename          ./new.in-progress/dir                    dest=./new.in-progress/o259-7-0
rename          ./new.in-progress/o259-7-0               dest=./new.in-progress/moved
update_extent   ./new.in-progress/moved/a                offset=0 len=2
mkfile          ./new.in-progress/o261-9-0
write           ./new.in-progress/o261-9-0               offset=0 len=2
rename          ./new.in-progress/o261-9-0               dest=./new.in-progress/moved/we\ ird\377
unlink          ./new.in-progress/gone
chmod           ./new.in-progress/mode                   mode=600
link            ./new.in-progress/second                 dest=mode
utimes          ./new.in-progress/                       atime=2026-12-05T08:54:23+0000 mtime=2026-12-05T08:54:23+0000"""


def test_a_stream_dump_is_read_as_the_manifest_lines_it_changes() -> None:
    found = changes_from_dump(DUMP.splitlines(), "new.in-progress")
    assert found is not None
    # The old paths whose entries left: the renamed directory, the deleted file (and the temporary names' targets).
    assert {b"dir", b"gone"} <= found.gone
    # Listed anew with what is below them: the moved directory, the new file at its final name, the new hard link.
    assert {b"moved", b"moved/we ird\xff", b"second"} <= found.fresh
    assert not any(p.startswith(b"o2") for p in found.fresh | found.touched)  # temporary names followed
    # Written in the moved directory (followed to its final path), a mode change; the root has no line.
    assert {b"moved/a", b"mode"} <= found.touched and b"" not in found.touched
    assert b".backup-agent-send/x" not in found.touched  # times alone: a manifest records none
    # Nothing changed: empty, so the parent's manifest is reused as it is.
    quiet = changes_from_dump(DUMP.splitlines()[:2], "new.in-progress")
    assert quiet is not None and quiet.empty
    # A command or a path not understood: nothing may be concluded.
    assert changes_from_dump(["frobnicate ./new.in-progress/a"], "new.in-progress") is None
    assert changes_from_dump([r"write ./new.in-progress/odd\q offset=0 len=1"], "new.in-progress") is None


def test_find_lines_matches_the_path_field_not_a_name_holding_it() -> None:
    body = b"".join(
        [
            manifests.line("ab" * 32, 1, 10, b"x y"),
            manifests._attributes_line(10, "f", b"644 0 0", 1, None, b"x y"),
            manifests.line("cd" * 32, 2, 11, b"y"),
            manifests._attributes_line(11, "f", b"644 0 0", 2, None, b"y"),
            manifests._attributes_line(12, "d", b"755 0 0", 0, None, b"d"),
            manifests.line("ef" * 32, 3, 13, b"d/y"),
        ]
    )
    data = manifests.header() + body
    start, cut = len(manifests.header()), len(data)
    lines = [data[b:e] for b, e in find_lines(data, start, cut, b"y", below=False)]
    assert len(lines) == 2 and all(line.endswith(b" y\n") and not line.endswith(b"x y\n") for line in lines)
    below = [data[b:e] for b, e in find_lines(data, start, cut, b"d", below=True)]
    assert below == [manifests.line("ef" * 32, 3, 13, b"d/y")]


def test_a_sender_stopped_by_sigpipe_after_the_reader_succeeded_is_no_failure(tmp_path: Path) -> None:
    """btrfs receive stops at the stream's end command, and send may write after it (a real race, seen in about 1 run of 15).

    Stand-ins at the process boundary: a reader that stops after one line,
    a writer that writes it, then writes more once the reader is gone.
    """
    from agent.core.commands import Runner
    from agent.core.errors import CommandError
    from agent.engine.send import _pipe

    lines: list[str] = []

    def writer(out: int) -> tuple[str, ...]:
        return ("/bin/sh", "-c", f"echo end >/proc/self/fd/{out}; sleep 0.3; exec yes >/proc/self/fd/{out}")

    _pipe(Runner(), writer, lambda read: ("/usr/bin/head", "-n1", f"/proc/self/fd/{read}"), "transfer", (), (), lines.append)
    assert lines == ["end"]
    # A reader that fails is still a failure, whatever the writer did.
    with pytest.raises(CommandError):
        _pipe(Runner(), writer, lambda read: ("/bin/sh", "-c", "exit 3"), "transfer", (), ())


def _sorted(manifest: manifests.Manifest) -> tuple[list[manifests.Entry], list[manifests.Attributes]]:
    return sorted(manifest.entries, key=lambda e: e.path), sorted(manifest.attributes, key=lambda a: a.path)


def _backup(source: Path, repo: Path, config: Path) -> tuple[str, dict[str, object]]:
    assert main(["backup", "--no-sudo", "-q", "--config", str(config), str(source), str(repo)]) == 0
    name = os.readlink(repo / "latest").split("/")[-1]
    return name, json.loads((repo / "metadata" / f"{name}.json").read_text())


def _walked(snapshot: Path, target: Path) -> manifests.Manifest:
    manifests.record(str(snapshot), str(target), manifests.Known())
    return manifests.load(str(target))


@pytest.mark.integration
@pytest.mark.parametrize("searches", [1000, 0], ids=["searched", "one-pass"])
def test_a_received_snapshots_manifest_is_made_from_the_stream_and_equals_a_walk(
    btrfs_dir: Path, tmp_path: Path, rsync_path: str, monkeypatch: pytest.MonkeyPatch, searches: int
) -> None:
    from agent.repository import manifest_stream

    monkeypatch.setattr(manifest_stream, "MAX_SEARCHES", searches)  # one search of the manifest per path, or one pass over it
    source, repo = btrfs_dir / "src", btrfs_dir / "repo"
    subprocess.run(["btrfs", "subvolume", "create", str(source)], check=True, capture_output=True)
    config = tmp_path / "send.toml"
    config.write_text(FAST_SEND)
    for name, text in [("changed", "one\n"), ("same", "same\n"), ("deleted", "bye\n"), ("renamed", "move me\n"),
                       ("dir/inner", "in a dir\n"), ("dir/deep/file", "deep\n"), ("linked", "shared\n"),
                       ("mode", "mode\n"), ("xattr", "xattr\n"), ("odd\nname with space", "odd\n")]:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text(text)
    os.link(source / "linked", source / "linked-too")
    os.symlink("same", source / "link")
    first, _ = _backup(source, repo, config)

    (source / "changed").write_text("two, longer\n")
    (source / "new-dir").mkdir()
    (source / "new-dir" / "new").write_text("new\n")
    (source / "deleted").unlink()
    (source / "renamed").rename(source / "renamed-to")
    (source / "dir").rename(source / "dir-moved")
    (source / "dir-moved" / "inner").write_text("changed after the move\n")
    with open(source / "linked", "r+") as handle:  # in place: both names are the new contents
        handle.write("SHARED")
    os.link(source / "same", source / "same-again")
    os.chmod(source / "mode", 0o600)
    os.setxattr(source / "xattr", "user.note", b"only the xattr")
    (source / "link").unlink()
    os.symlink("changed", source / "link")
    (source / "odd\nname with space").write_text("odd, changed\n")  # the dump escapes it as odd\nname\ with\ space
    second, meta = _backup(source, repo, config)

    recorded = meta["manifest"]
    assert isinstance(recorded, dict) and recorded["from_stream"] == "changes"
    assert recorded["hashed_files"] < 10  # the changed ones, not the whole tree
    snapshot = repo / "snapshots" / second
    made = manifests.load(str(repo / "metadata" / f"{second}.manifest"))
    assert _sorted(made) == _sorted(_walked(snapshot, tmp_path / "walked.manifest"))
    by_path = {e.path: e for e in made.entries}
    assert by_path[b"linked-too"].digest == by_path[b"linked"].digest != by_path[b"same"].digest
    assert b"deleted" not in by_path and b"renamed-to" in by_path and b"dir-moved/deep/file" in by_path

    # Nothing changed: the parent's manifest, byte for byte (read first: rotation may delete the parent).
    before = (repo / "metadata" / f"{second}.manifest").read_bytes()
    third, meta = _backup(source, repo, config)
    assert isinstance(meta["manifest"], dict) and meta["manifest"]["from_stream"] == "clone"
    assert (repo / "metadata" / f"{third}.manifest").read_bytes() == before
    assert main(["verify", "--all", "-q", "--config", str(config), "--repository", str(repo)]) == 0

    # A file changed in the snapshot afterwards (same size) is caught.
    kept = repo / "snapshots" / third
    subprocess.run(["btrfs", "property", "set", "-f", "-ts", str(kept), "ro", "false"], check=True, capture_output=True)  # -f: a received snapshot
    (kept / "same").write_text("SAME\n")
    subprocess.run(["btrfs", "property", "set", "-ts", str(kept), "ro", "true"], check=True)
    assert main(["verify", "-q", "--config", str(config), "--repository", str(repo), third]) != 0
    assert first != second


def _mutations(source: Path) -> list[list[tuple[str, ...]]]:
    """Rounds of changes that make btrfs send order renames through temporary names (swaps, nesting, replacing)."""
    return [
        [("swap", "a", "b"), ("write", "c/one", "1"), ("rename", "c", "a/c"), ("over", "d/x", "d/y")],
        [("rmtree", "a"), ("file_for_dir", "b"), ("dir_for_file", "d/y"), ("rename", "e/f/g", "g"), ("chmod", "g/h")],
        [("swap", "b", "g"), ("write", "b/h", "22"), ("link", "b/h", "e/h-too"), ("unlink", "e/f/k")],
    ]


def _apply(source: Path, change: tuple[str, ...]) -> None:
    kind, *args = change
    path = source / args[0]
    if kind == "swap":
        other = source / args[1]
        path.rename(source / "swap-tmp")
        other.rename(path)
        (source / "swap-tmp").rename(other)
    elif kind == "write":
        path.write_text(args[1])
    elif kind == "rename":
        path.rename(source / args[1])
    elif kind == "over":
        path.rename(source / args[1])  # replaces the file there
    elif kind == "rmtree":
        shutil.rmtree(path)
    elif kind == "file_for_dir":
        shutil.rmtree(path)
        path.write_text("now a file")
    elif kind == "dir_for_file":
        path.unlink()
        path.mkdir()
        (path / "inside").write_text("in the new directory")
    elif kind == "chmod":
        os.chmod(path, 0o640)
    elif kind == "link":
        os.link(path, source / args[1])
    elif kind == "unlink":
        path.unlink()


@pytest.mark.integration
@pytest.mark.parametrize("searches", [1000, 0], ids=["searched", "one-pass"])
def test_renames_through_temporary_names_give_the_walks_manifest(
    btrfs_dir: Path, tmp_path: Path, rsync_path: str, monkeypatch: pytest.MonkeyPatch, searches: int
) -> None:
    from agent.repository import manifest_stream

    monkeypatch.setattr(manifest_stream, "MAX_SEARCHES", searches)
    source, repo = btrfs_dir / "src", btrfs_dir / "repo"
    subprocess.run(["btrfs", "subvolume", "create", str(source)], check=True, capture_output=True)
    config = tmp_path / "send.toml"
    config.write_text(FAST_SEND)
    for rel in ["a/1", "a/2", "b/1", "b/3", "c/one", "d/x", "d/y", "e/f/g/h", "e/f/k", "top"]:
        (source / rel).parent.mkdir(parents=True, exist_ok=True)
        (source / rel).write_text(f"{rel}\n")
    _backup(source, repo, config)
    for number, changes in enumerate(_mutations(source)):
        for change in changes:
            _apply(source, change)
        name, meta = _backup(source, repo, config)
        recorded = meta["manifest"]
        assert isinstance(recorded, dict) and recorded.get("from_stream") == "changes", (number, recorded)
        made = manifests.load(str(repo / "metadata" / f"{name}.manifest"))
        assert _sorted(made) == _sorted(_walked(repo / "snapshots" / name, tmp_path / f"walked-{number}.manifest")), number


@pytest.mark.integration
def test_a_damaged_parent_manifest_falls_back_to_the_walk(
    btrfs_dir: Path, tmp_path: Path, rsync_path: str
) -> None:
    source, repo = btrfs_dir / "src", btrfs_dir / "repo"
    subprocess.run(["btrfs", "subvolume", "create", str(source)], check=True, capture_output=True)
    config = tmp_path / "send.toml"
    config.write_text(FAST_SEND)
    (source / "a").write_text("a\n")
    first, _ = _backup(source, repo, config)
    parent = repo / "metadata" / f"{first}.manifest"
    parent.write_bytes(parent.read_bytes().replace(b" a\n", b" b\n"))  # no longer matches its own checksum
    second, meta = _backup(source, repo, config)  # nothing changed: a clone would copy the damage
    assert isinstance(meta["manifest"], dict) and "from_stream" not in meta["manifest"]
    assert [e.path for e in manifests.load(str(repo / "metadata" / f"{second}.manifest")).entries] == [b"a"]

    # A line its checksum vouches for (anyone who can write the disk can make one) but that is not
    # one this writes: the walk, not a crash.
    latest = repo / "metadata" / f"{second}.manifest"
    data = latest.read_bytes()
    head, cut = len(manifests.header()), data.rindex(b"# end ")
    body = re.sub(rb"^([0-9a-f]{64} [0-9]+ )[0-9]+( a\n)", rb"\1zz\2", data[head:cut], flags=re.MULTILINE)
    assert body != data[head:cut]
    latest.write_bytes(manifests.render(body, 1)[0])
    (source / "a").write_text("changed\n")
    third, meta = _backup(source, repo, config)
    assert isinstance(meta["manifest"], dict) and "from_stream" not in meta["manifest"]
    made = manifests.load(str(repo / "metadata" / f"{third}.manifest"))
    assert _sorted(made) == _sorted(_walked(repo / "snapshots" / third, tmp_path / "walked.manifest"))
