"""Opening a repository for reading (agent/disk/access.py).

A repository by path needs nothing else. The disk lifecycle runs on
tests/test_disk.py's rig: a real LUKS2 header on a loop device (real blkid,
cryptsetup checking the key), a plain ext4 image on a second loop device that
the stand-in cryptdisks_start exposes as the mapped device (this kernel has no
device-mapper; only that step is replaced), real mount and umount.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import socket
from pathlib import Path

import pytest

from agent.disk.identity import record_id
from agent.core import lock
from agent.disk.access import open_repository, read_only
from agent.core.commands import Runner
from agent.config.model import Disk, Settings
from agent.cli import main
from agent.core.errors import EXIT_REPOSITORY, BusyError, DiskMissingError, RepositoryError, UsageError, WrongDiskError
from agent.repository.store import Repository
from tests.test_disk import NAME, Rig, _assert_closed, make_disk, rig  # noqa: F401  (rig is the fixture used here)


def _open(settings: Settings, warnings: list[str], **given: str | None) -> contextlib.AbstractContextManager[Repository]:
    return open_repository(
        settings, Runner(), repository=given.get("repository"), disk=given.get("disk"), warn=warnings.append, command="versions"
    )


# -- without a disk ------------------------------------------------------------


def test_a_repository_by_path_is_opened_as_it_is(tmp_path: Path) -> None:
    made = Repository.create(str(tmp_path / "repo"))
    warnings: list[str] = []
    # A configured disk is not touched when --repository is given.
    settings = Settings(path=None, disks=(make_disk(),))
    with _open(settings, warnings, repository=str(tmp_path / "repo")) as repo:
        assert (repo.root, repo.marker) == (made.root, made.marker)
    assert warnings == []


def test_the_configured_repository_without_disks(tmp_path: Path) -> None:
    made = Repository.create(str(tmp_path / "repo"))
    with _open(Settings(path=None, repository=made.root), []) as repo:
        assert repo.marker.id == made.marker.id


def test_bad_choices_are_one_line_each(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="give either --repository .* or --disk .*, not both"):
        with _open(Settings(path=None), [], repository=str(tmp_path), disk="x"):
            pytest.fail("the body must not run")
    with pytest.raises(UsageError, match="no repository: give --repository DIR"):
        with _open(Settings(path=None), []):
            pytest.fail("the body must not run")
    with pytest.raises(UsageError, match="--disk other: no configured disk matches; configured: backup-test"):
        with _open(Settings(path=None, disks=(make_disk(),)), [], disk="other"):
            pytest.fail("the body must not run")
    with pytest.raises(RepositoryError, match="is not a backup-agent repository"):
        with _open(Settings(path=None), [], repository=str(tmp_path)):
            pytest.fail("the body must not run")


def test_read_only_adds_ro_only_to_options_that_are_ours() -> None:
    direct = make_disk(filesystem="ext4", mount_options=("noatime", "rw"))
    assert read_only(direct).mount_options == ("noatime", "ro")
    assert read_only(make_disk(filesystem="ext4")).mount_options == ("ro",)
    through_fstab = make_disk()
    assert read_only(through_fstab) == through_fstab


# -- through the disk lifecycle ----------------------------------------------------


def _prepare(rig: Rig) -> tuple[Disk, Settings, str]:
    """A repository on the disk, its id recorded on this machine; the disk closed again."""
    disk, settings = rig.setup()
    with rig.opened(disk, settings):
        made = Repository.create(disk.repository, host=socket.gethostname())
        record_id(settings, disk, made.marker.id)
    _assert_closed(rig)
    rig.log.unlink()
    return disk, settings, made.marker.id


@pytest.mark.integration
@pytest.mark.parametrize("named", [True, False])
def test_a_locked_disk_is_opened_read_only_under_the_lock_and_closed_again(rig: Rig, named: bool) -> None:
    disk, settings, repository_id = _prepare(rig)
    warnings: list[str] = []
    with _open(settings, warnings, disk=NAME if named else None) as repo:
        assert repo.marker.id == repository_id
        assert repo.root == disk.repository
        assert rig.top() is not None and rig.is_unlocked()
        with pytest.raises(OSError) as refused:
            (rig.mount_point / "written.txt").write_text("no\n")
        assert refused.value.errno == errno.EROFS
        # A backup cycle started now is refused instead of unmounting the disk.
        with pytest.raises(BusyError, match=r"backup-agent versions is running \(pid "):
            lock.probe(lock.machine_lock_path())
    _assert_closed(rig)
    assert rig.calls() == [("start", 0), ("stop", 0)]
    assert warnings == []
    lock.probe(lock.machine_lock_path())  # released


@pytest.mark.integration
def test_a_failing_body_still_leaves_the_disk_as_found(rig: Rig) -> None:
    disk, settings, _id = _prepare(rig)
    with pytest.raises(RuntimeError, match="reading failed"):
        with _open(settings, [], disk=NAME):
            raise RuntimeError("reading failed")
    _assert_closed(rig)
    assert rig.calls() == [("start", 0), ("stop", 0)]


@pytest.mark.integration
def test_a_disk_found_open_stays_open_and_writable(rig: Rig) -> None:
    disk, settings, _id = _prepare(rig)
    rig.unlock_by_hand()
    rig.mount_by_hand(str(rig.mapped))
    before = rig.top()
    with _open(settings, [], disk=NAME) as repo:
        assert repo.root == disk.repository
    assert rig.top() == before is not None
    assert rig.is_unlocked()
    assert rig.calls() == []
    (rig.mount_point / "still-writable.txt").write_text("yes\n")  # the user's own rw mount was not touched


@pytest.mark.integration
def test_through_fstab_the_lines_options_apply(rig: Rig) -> None:
    disk, settings, _id = _prepare(rig)
    settings = dataclasses.replace(settings, disks=(dataclasses.replace(disk, filesystem=None),))
    with _open(settings, [], disk=NAME):
        (rig.mount_point / "host" / "fstab-says-rw").write_text("rw\n")
    _assert_closed(rig)


@pytest.mark.integration
def test_another_machines_repository_is_refused_and_the_disk_closed(rig: Rig) -> None:
    disk, settings, _id = _prepare(rig)
    record_id(settings, disk, "f" * 32)
    with pytest.raises(WrongDiskError, match=f"this is not the disk backup-agent knows as {NAME}"):
        with _open(settings, [], disk=NAME):
            pytest.fail("the body must not run")
    _assert_closed(rig)
    assert rig.calls() == [("start", 0), ("stop", 0)]


@pytest.mark.integration
def test_a_disk_that_is_not_attached(rig: Rig) -> None:
    disk, settings = rig.setup()
    absent = dataclasses.replace(disk, name="gone", luks_uuid="12345678-9abc-4def-8123-456789abcdef")
    settings = dataclasses.replace(settings, disks=(absent,))
    with pytest.raises(DiskMissingError, match="backup disk gone is not attached .*plug it in"):
        with _open(settings, [], disk="gone"):
            pytest.fail("the body must not run")
    with pytest.raises(DiskMissingError, match="no configured backup disk is attached: looked for gone .*--repository DIR"):
        with _open(settings, []):
            pytest.fail("the body must not run")
    assert rig.calls() == []
    lock.probe(lock.machine_lock_path())


@pytest.mark.integration
def test_a_running_backup_keeps_the_disk_closed(rig: Rig) -> None:
    disk, settings, _id = _prepare(rig)
    with lock.hold(lock.machine_lock_path(), {"pid": os.getpid(), "repository": disk.repository}):
        with pytest.raises(BusyError, match="another backup is running"):
            with _open(settings, [], disk=NAME):
                pytest.fail("the body must not run")
    _assert_closed(rig)
    assert rig.calls() == []


READING = [
    ["list", "{missing}"],
    ["versions", "--repository", "{missing}", "/x"],
    ["diff", "--repository", "{missing}"],
    ["restore", "--repository", "{missing}", "/x"],
    ["verify", "--repository", "{missing}"],
]


@pytest.mark.parametrize("argv", READING, ids=[a[0] for a in READING])
def test_a_missing_repository_is_one_line_naming_no_backup_step(
    tmp_path: Path, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing"
    assert main([part.format(missing=missing) for part in argv]) == EXIT_REPOSITORY
    assert capsys.readouterr().err == f"backup-agent: {missing} does not exist: give an existing repository\n"
    assert not missing.exists()


def test_the_backup_still_names_its_step(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The same error from Repository.open, met by the cycle, keeps the cycle's step."""
    repo = tmp_path / "repo"
    Repository.create(str(repo))
    (repo / ".backup-agent.toml").write_bytes(b"\xff not a marker\n")
    (tmp_path / "source").mkdir()
    capsys.readouterr()
    assert main(["backup", "--no-sudo", "-q", str(tmp_path / "source"), str(repo)]) == EXIT_REPOSITORY
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"backup-agent: prepare failed: {repo}/.backup-agent.toml: cannot read the repository marker"), err
