"""write_atomic: the old file or the new one, never half of one, and nothing left behind."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agent.core.files import rename_noreplace, write_atomic


def test_replaces_with_the_mode_asked_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("old")
    write_atomic(str(target), b"new", mode=0o640)
    assert target.read_text() == "new"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o640
    assert os.listdir(tmp_path) == ["file"]


def test_a_refusing_check_keeps_the_old_file_and_removes_the_temporary(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("old")
    seen: list[str] = []

    def refuse(temporary: str) -> None:
        seen.append(Path(temporary).read_text())
        raise ValueError("no")

    with pytest.raises(ValueError):
        write_atomic(str(target), b"new", check=refuse, prefix=".x.", suffix=".new")
    assert seen == ["new"]  # the check saw the finished file
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["file"]


def test_the_temporary_is_named_as_asked_beside_the_target(tmp_path: Path) -> None:
    names: list[str] = []
    write_atomic(str(tmp_path / "file"), b"x", prefix=".marker.tmp-", suffix=".t", check=lambda t: names.append(t))
    (name,) = names
    assert os.path.dirname(name) == str(tmp_path)
    assert os.path.basename(name).startswith(".marker.tmp-") and name.endswith(".t")


@pytest.mark.skipif(os.geteuid() != 0, reason="setting a file's owner needs root")
def test_owner_is_set_before_the_file_is_visible(tmp_path: Path) -> None:
    owners: list[tuple[int, int]] = []

    def look(temporary: str) -> None:
        info = os.stat(temporary)
        owners.append((info.st_uid, info.st_gid))

    write_atomic(str(tmp_path / "file"), b"x", owner=(4242, 4343), check=look)
    assert owners == [(4242, 4343)]
    info = os.stat(tmp_path / "file")
    assert (info.st_uid, info.st_gid) == (4242, 4343)


def test_rename_noreplace_renames_a_file_or_a_directory_to_a_free_name(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "inside").write_text("kept")
    (tmp_path / "f").write_text("f")
    rename_noreplace(str(tmp_path / "d"), str(tmp_path / "d2"))
    rename_noreplace(str(tmp_path / "f"), str(tmp_path / "f2"))
    assert sorted(os.listdir(tmp_path)) == ["d2", "f2"]
    assert (tmp_path / "d2" / "inside").read_text() == "kept"


@pytest.mark.parametrize("taken", ["file", "empty directory", "symbolic link"])
def test_rename_noreplace_never_replaces_what_is_there(tmp_path: Path, taken: str) -> None:
    """os.rename would replace each of these (an empty directory by a directory, the rest by a file)."""
    source, target = tmp_path / "source", tmp_path / "target"
    if taken == "empty directory":
        source.mkdir()
        target.mkdir()
    elif taken == "file":
        source.write_text("source")
        target.write_text("target")
    else:
        source.write_text("source")
        target.symlink_to("nowhere")
    with pytest.raises(FileExistsError):
        rename_noreplace(str(source), str(target))
    assert source.exists()
    if taken == "file":
        assert target.read_text() == "target"
    elif taken == "symbolic link":
        assert os.readlink(target) == "nowhere"
    else:
        assert target.is_dir() and not target.is_symlink()


def test_rename_noreplace_says_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as caught:
        rename_noreplace(str(tmp_path / "gone"), str(tmp_path / "new"))
    assert caught.value.filename == str(tmp_path / "gone") and caught.value.filename2 == str(tmp_path / "new")
