"""The encrypted disk's lifecycle (agent/disk.py): pure rules, then real parts.

The integration tests (``-m integration``) use a real LUKS2 header on a loop
device (blkid finds its UUID, cryptsetup checks the key), real ext4 and
NTFS images on loop devices, and the real mount, umount, sync and blkid. This
kernel has no device-mapper, so ONLY the mapping step is replaced: a stand-in
for cryptdisks_start/stop (tests/helpers/fake_cryptdisks.py) checks the key
against the real header and exposes a plain image as the "mapped device" (a
symbolic link in the test's directory). A last test runs the real
cryptdisks_start where device-mapper exists.

Each test cleans up what it made: its mounts (all under its tmp_path), the
loop devices it attached (by the names losetup gave it), its images.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from agent.disk.devices import device_number, top_mount
from agent.disk.find import find_device, parse_blkid_export, present_disks
from agent.disk.identity import (
    UNSUPPORTED_FILESYSTEMS,
    check_marker,
    check_mount,
    id_path,
    record_id,
    recorded_id,
    verify_mount,
)
from agent.disk.mount import disk_full, holders, mount_argv, mounted, umount_argv
from agent.disk.tables import CrypttabEntry, FstabEntry, fstab_entry_for, parse_crypttab, parse_fstab
from agent.disk.unlock import key_file_problem, systemd_escape, unlock_argv, unlock_method, unlocked
from agent.core.commands import Runner
from agent.config.model import Commands, Disk, Settings
from agent.core.errors import DiskBusyError, DiskError, UnsafeKeyFileError, WrongDiskError
from agent.core.mounts import MountEntry, read_mountinfo
from agent.repository.store import Marker

from tests.helpers import fake_cryptdisks

NAME = "backup-test"
UUID = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"


def make_disk(**changes: Any) -> Disk:
    values: dict[str, Any] = dict(
        name=NAME,
        luks_uuid=UUID,
        mount_point="/mnt/backup",
        mapped_device=f"/dev/mapper/{NAME}",
        repository="/mnt/backup/host",
    )
    values.update(changes)
    return Disk(**values)


def stat_result(*, mode: int = 0o100600, uid: int = 0, dev: int = 2049) -> os.stat_result:
    # (st_mode, st_ino, st_dev, st_nlink, st_uid, st_gid, st_size, st_atime, st_mtime, st_ctime)
    return os.stat_result((mode, 12, dev, 1, uid, 0, 64, 0, 0, 0))


# ==========================================================================
# Pure rules


def test_parse_crypttab_fields_comments_and_uuid_devices() -> None:
    text = """\
# <target name> <source device> <key file> <options>
backup UUID=0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d /etc/backup-agent/keys/backup.key luks,noauto

   # indented comment
offsite	/dev/disk/by-uuid/11111111-2222-3333-4444-555555555555	none	luks,discard
typed UUID=22222222-3333-4444-5555-666666666666 -
bare /dev/sdb2
short
backup UUID=ffffffff-ffff-ffff-ffff-ffffffffffff /other.key luks
"""
    entries = parse_crypttab(text)
    assert set(entries) == {"backup", "offsite", "typed", "bare"}
    assert entries["backup"] == CrypttabEntry(
        "backup", "UUID=0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d", "/etc/backup-agent/keys/backup.key", ("luks", "noauto")
    )
    assert entries["offsite"].device == "/dev/disk/by-uuid/11111111-2222-3333-4444-555555555555"
    assert entries["offsite"].key_file is None  # "none"
    assert entries["offsite"].options == ("luks", "discard")
    assert entries["typed"].key_file is None  # "-"
    assert entries["typed"].options == ()
    assert entries["bare"] == CrypttabEntry("bare", "/dev/sdb2", None, ())  # absent
    assert parse_crypttab("") == {}


def test_parse_fstab_decodes_escapes_and_defaults() -> None:
    text = """\
# comment
UUID=abcd /          ext4 errors=remount-ro 0 1
/dev/mapper/backup /media/My\\040Backup\\011Disk ext4 noauto,nofail 0 2

/dev/sdc1 /mnt/a\\134b
"""
    entries = parse_fstab(text)
    assert entries == [
        FstabEntry("UUID=abcd", "/", "ext4", ("errors=remount-ro",)),
        FstabEntry("/dev/mapper/backup", "/media/My Backup\tDisk", "ext4", ("noauto", "nofail")),
        FstabEntry("/dev/sdc1", "/mnt/a\\b", "auto", ("defaults",)),
    ]
    assert fstab_entry_for(entries, "/media/My Backup\tDisk/") == entries[1]
    assert fstab_entry_for(entries, "/media/other") is None


def test_crypttab_and_fstab_decode_every_field_alike() -> None:
    # The same escaped fields, in crypttab and in fstab, read the same: names,
    # paths and options alike; bytes are decoded together (UTF-8 "é" is \303\251),
    # an escaped comma stays inside its option, and a lone backslash stays.
    path = "/media/Sauvegarde\\040\\303\\251t\\303\\251"
    options = "luks,header=/etc/keys/a\\040b\\054c.hdr,x\\y"
    crypttab = parse_crypttab(f"backup UUID=abcd {path}/key {options}\n")
    fstab = parse_fstab(f"/dev/mapper/backup {path} ext4 {options} 0 2\n")
    decoded = ("luks", "header=/etc/keys/a b,c.hdr", "x\\y")
    assert crypttab["backup"] == CrypttabEntry("backup", "UUID=abcd", "/media/Sauvegarde \u00e9t\u00e9/key", decoded)
    assert fstab == [FstabEntry("/dev/mapper/backup", "/media/Sauvegarde \u00e9t\u00e9", "ext4", decoded)]


@pytest.mark.parametrize(
    ("name", "escaped"),
    [
        ("backup", "backup"),
        ("backup-disk", "backup\\x2ddisk"),
        ("disk_2.old:x", "disk_2.old:x"),
        (".hidden", "\\x2ehidden"),
        ("a.b", "a.b"),
        ("a b/c", "a\\x20b-c"),
        ("a\\b", "a\\x5cb"),
        ("é", "\\xc3\\xa9"),
    ],
)
def test_systemd_escape(name: str, escaped: str) -> None:
    assert systemd_escape(name) == escaped


def test_systemd_escape_agrees_with_systemd() -> None:
    program = shutil.which("systemd-escape")
    if program is None:
        pytest.skip(reason="systemd-escape is not installed (package systemd)")
    names = ["backup", "backup-disk", ".x", "a b/c", "a\\b", "é", "x:y_z.w", "-lead", "trail-"]
    for name in names:
        real = subprocess.run([program, "--", name], capture_output=True, text=True, check=True).stdout.strip()
        assert systemd_escape(name) == real, name


def test_unlock_method_auto_prefers_cryptdisks() -> None:
    auto = make_disk(unlock="auto")
    assert unlock_method(auto, True, True) == "cryptdisks"
    assert unlock_method(auto, False, True) == "systemd"
    with pytest.raises(DiskError, match="neither cryptdisks_start"):
        unlock_method(auto, False, False)
    assert unlock_method(make_disk(unlock="systemd"), True, True) == "systemd"
    assert unlock_method(make_disk(unlock="cryptdisks"), True, False) == "cryptdisks"
    with pytest.raises(DiskError, match="cryptdisks_start is not installed"):
        unlock_method(make_disk(unlock="cryptdisks"), False, True)
    with pytest.raises(DiskError, match="systemctl is not installed"):
        unlock_method(make_disk(unlock="systemd"), True, False)


def test_unlock_argv() -> None:
    commands = Commands(cryptdisks_start="/x/start", cryptdisks_stop="/x/stop", systemctl="/x/systemctl")
    disk = make_disk(name="backup-disk")
    assert unlock_argv(disk, "cryptdisks", commands) == (("/x/start", "backup-disk"), ("/x/stop", "backup-disk"))
    assert unlock_argv(disk, "systemd", commands) == (
        ("/x/systemctl", "start", "systemd-cryptsetup@backup\\x2ddisk.service"),
        ("/x/systemctl", "stop", "systemd-cryptsetup@backup\\x2ddisk.service"),
    )
    with pytest.raises(ValueError):
        unlock_argv(disk, "auto", commands)


def test_mount_and_umount_argv() -> None:
    settings = Settings(path=None, fstab="/tmp/fstab", commands=Commands(mount="/m/mount", umount="/m/umount"))
    direct = make_disk(filesystem="ext4", mount_options=("noatime", "nodev"))
    assert mount_argv(direct, settings) == (
        "/m/mount", "-t", "ext4", "-o", "noatime,nodev", f"/dev/mapper/{NAME}", "/mnt/backup",
    )
    assert mount_argv(make_disk(filesystem="xfs"), settings) == (
        "/m/mount", "-t", "xfs", f"/dev/mapper/{NAME}", "/mnt/backup",
    )
    assert mount_argv(make_disk(), settings) == ("/m/mount", "--fstab", "/tmp/fstab", "/mnt/backup")
    umount = umount_argv(direct, settings)
    assert umount == ("/m/umount", "/mnt/backup")
    assert not any(arg.startswith("-") for arg in umount)  # never -l


def test_key_file_problem() -> None:
    key = "/etc/backup-agent/keys/b.key"
    assert key_file_problem(key, stat_result(mode=0o100400), on_backup_disk=False) is None
    assert key_file_problem(key, stat_result(mode=0o100600), on_backup_disk=False) is None
    for mode in (0o100640, 0o100604, 0o100620, 0o100602, 0o100644, 0o100610):
        problem = key_file_problem(key, stat_result(mode=mode), on_backup_disk=False)
        assert problem is not None and f"mode {mode & 0o7777:04o}" in problem and "chmod 0400" in problem, oct(mode)
    problem = key_file_problem(key, stat_result(uid=1000), on_backup_disk=False)
    assert problem is not None and "uid 1000, not root" in problem
    problem = key_file_problem(key, stat_result(), on_backup_disk=True)
    assert problem is not None and "lies on the backup disk itself" in problem


MAPPED = "254:3"
ROOT = "254:0"


def entry(mount_point: str = "/mnt/backup", device: str = MAPPED, fstype: str = "ext4", source: str = "/dev/mapper/x") -> MountEntry:
    return MountEntry(mount_point=mount_point, fstype=fstype, source=source, device=device)


def test_check_mount_accepts_the_mapped_device() -> None:
    mounts = [entry("/", ROOT, source="/dev/vda"), entry()]
    assert check_mount(make_disk(), mounts, MAPPED, ROOT) == entry()
    # The configured path may carry a trailing slash or dots.
    assert check_mount(make_disk(mount_point="/mnt/./backup/"), mounts, MAPPED, ROOT) == entry()


def test_check_mount_refuses_an_empty_mount_point() -> None:
    mounts = [entry("/", ROOT, source="/dev/vda"), entry("/mnt/backup2")]
    with pytest.raises(WrongDiskError, match="/mnt/backup is not mounted: nothing is written to an empty mount point on the root filesystem"):
        check_mount(make_disk(), mounts, MAPPED, ROOT)


def test_check_mount_refuses_another_device_and_names_it() -> None:
    mounts = [entry(device="8:17", source="/dev/sdb1", fstype="ext4")]
    with pytest.raises(WrongDiskError, match=r"mounted from /dev/sdb1 \(ext4, device 8:17\), not from the backup disk"):
        check_mount(make_disk(), mounts, MAPPED, ROOT)


def test_check_mount_refuses_the_root_device() -> None:
    with pytest.raises(WrongDiskError, match="root filesystem's device"):
        check_mount(make_disk(), [entry(device=ROOT)], ROOT, ROOT)


def test_check_mount_last_stacked_mount_wins() -> None:
    ours_below = [entry(), entry(device="8:17", source="/dev/sdb1")]
    with pytest.raises(WrongDiskError, match="/dev/sdb1"):
        check_mount(make_disk(), ours_below, MAPPED, ROOT)
    ours_on_top = [entry(device="8:17", source="/dev/sdb1"), entry()]
    assert check_mount(make_disk(), ours_on_top, MAPPED, ROOT).device == MAPPED


@pytest.mark.parametrize("fstype", ["vfat", "msdos", "exfat", "ntfs", "ntfs3", "fuseblk"])
def test_check_mount_refuses_filesystems_without_links_or_owners(fstype: str) -> None:
    with pytest.raises(WrongDiskError, match=f"holds {fstype}, .*format .* as ext4, xfs or btrfs"):
        check_mount(make_disk(), [entry(fstype=fstype)], MAPPED, ROOT)
    assert fstype in UNSUPPORTED_FILESYSTEMS


@pytest.mark.parametrize("fstype", ["ext4", "xfs", "btrfs", "ext3", "f2fs"])
def test_check_mount_accepts_unix_filesystems(fstype: str) -> None:
    assert check_mount(make_disk(), [entry(fstype=fstype)], MAPPED, ROOT).fstype == fstype


def marker(id: str = "a" * 32, host: str = "laptop") -> Marker:
    return Marker(version=1, id=id, host=host, created="2026-11-22T13:00:00+01:00")


def test_check_marker() -> None:
    disk = make_disk()
    check_marker(disk, marker(), "a" * 32, "laptop")
    with pytest.raises(WrongDiskError, match=f"no backup-agent repository at /mnt/backup/host .*backup-agent init --disk {NAME}"):
        check_marker(disk, None, "a" * 32, "laptop")
    with pytest.raises(WrongDiskError, match=f"no repository id is recorded .*backup-agent init --disk {NAME}"):
        check_marker(disk, marker(), None, "laptop")
    with pytest.raises(
        WrongDiskError,
        match=(
            f"this is not the disk backup-agent knows as {NAME}: same label or cloned LUKS UUID, "
            f"another repository \\(id {'b' * 32}, expected {'a' * 32}\\); nothing was written"
        ),
    ):
        check_marker(disk, marker(id="b" * 32), "a" * 32, "laptop")
    with pytest.raises(WrongDiskError, match="belongs to host desktop, not to this machine \\(laptop\\)"):
        check_marker(disk, marker(host="desktop"), "a" * 32, "laptop")


def test_parse_blkid_export() -> None:
    lines = ["DEVNAME=/dev/sdb2", "UUID=abc", "TYPE=crypto_LUKS", "", "", "DEVNAME=/dev/sdc1", "LABEL=My\\ Disk", "TYPE=ext4"]
    assert parse_blkid_export(lines) == [
        {"DEVNAME": "/dev/sdb2", "UUID": "abc", "TYPE": "crypto_LUKS"},
        {"DEVNAME": "/dev/sdc1", "LABEL": "My Disk", "TYPE": "ext4"},
    ]
    assert parse_blkid_export([line for line in lines if line]) == parse_blkid_export(lines)
    assert parse_blkid_export([]) == []


def test_disk_full() -> None:
    assert disk_full(['rsync: [receiver] write failed on "/mnt/x/f": No space left on device (28)'])
    assert disk_full(["x", 'rsync: mkstemp "/m/.f.XYZ" failed: Disk quota exceeded (122)'])
    assert not disk_full(["rsync: connection unexpectedly closed", "rsync error: some files vanished (24)"])
    assert not disk_full([])


def test_record_and_read_the_repository_id(tmp_path: Path) -> None:
    settings = Settings(path=None, state_dir=str(tmp_path / "state" / "lib"))
    disk = make_disk()
    assert recorded_id(settings, disk) is None
    old_umask = os.umask(0o077)  # the modes must not depend on the caller's umask
    try:
        record_id(settings, disk, "0123abcd" * 4)
    finally:
        os.umask(old_umask)
    path = Path(id_path(settings, disk))
    assert path == tmp_path / "state" / "lib" / "disks" / f"{NAME}.id"
    assert path.read_text() == "0123abcd" * 4 + "\n"
    assert path.stat().st_mode & 0o7777 == 0o644
    for directory in (tmp_path / "state", tmp_path / "state" / "lib", path.parent):
        assert directory.stat().st_mode & 0o7777 == 0o755, directory
    assert recorded_id(settings, disk) == "0123abcd" * 4
    record_id(settings, disk, "f" * 32)  # replaced atomically, no temporary left
    assert recorded_id(settings, disk) == "f" * 32
    assert sorted(p.name for p in path.parent.iterdir()) == [f"{NAME}.id"]
    path.chmod(0o666)
    with pytest.raises(DiskError, match="writable by root only"):
        recorded_id(settings, disk)
    with pytest.raises(ValueError):
        record_id(settings, disk, "two\nlines")


# ==========================================================================
# Real parts


def _require_parts(*programs: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(reason="needs root for loop devices, cryptsetup and mount: run the suite as root")
    missing = [program for program in ("losetup", "cryptsetup", "mkfs.ext4", "blkid", "mount", "umount", *programs) if shutil.which(program) is None]
    if missing:
        pytest.skip(reason=f"missing {', '.join(missing)}: run scripts/test, which installs them")
    if not os.path.exists("/dev/loop-control"):
        pytest.skip(reason="no /dev/loop-control: this kernel has no loop devices")


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check)


def _within(path: str, directory: Path) -> bool:
    return path == str(directory) or path.startswith(str(directory) + "/")


class Rig:
    """A LUKS disk on loop devices, its crypttab, key, fstab, stand-ins and mount point; cleans up after itself.

    ``name``: the disk's name in the config and crypttab (the README's pictures call it backup1).
    """

    def __init__(self, tmp_path: Path, trusted: Path, name: str = NAME) -> None:
        self.name = name
        self.tmp = tmp_path
        self.trusted = trusted
        self.loops: list[tuple[str, Path]] = []
        self.processes: list[subprocess.Popen[str]] = []
        self.warnings: list[str] = []
        self.mapper = tmp_path / "mapper"
        self.mapper.mkdir()
        self.mount_point = tmp_path / "mnt"
        self.mount_point.mkdir()
        self.bin = trusted / "bin"
        self.bin.mkdir(mode=0o755)
        keys = trusted / "keys"
        keys.mkdir(mode=0o755)
        self.key = keys / f"{self.name}.key"
        self.key.write_bytes(secrets.token_bytes(64))
        self.key.chmod(0o600)
        self.log = tmp_path / "cryptdisks.log"
        self.crypttab = tmp_path / "crypttab"
        self.fstab = tmp_path / "fstab"
        self.luks_image = tmp_path / "luks.img"
        _run("truncate", "-s", "20M", str(self.luks_image))
        _run(
            "cryptsetup", "luksFormat", "--type", "luks2", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
            "--batch-mode", str(self.luks_image), str(self.key),
        )
        self.luks_uuid = _run("cryptsetup", "luksUUID", str(self.luks_image)).stdout.strip()
        self.luks_device = self.attach(self.luks_image)
        self.plain_device = self.attach(self.image("plain.img", "ext4"))
        self.write_crypttab(self.key)
        self.fstab.write_text(f"# test fstab\n{self.mapped} {self.mount_point} ext4 noauto,nofail 0 0\n")

    # -- building ------------------------------------------------------------

    def image(self, name: str, fstype: str | None) -> Path:
        path = self.tmp / name
        _run("truncate", "-s", "20M", str(path))
        if fstype == "ext4":
            _run("mkfs.ext4", "-q", "-F", str(path))
        elif fstype == "ntfs":
            _run("mkntfs", "-F", "-Q", "-q", str(path))
        elif fstype == "vfat":
            _run("mkfs.vfat", str(path))
        return path

    def attach(self, image: Path) -> str:
        device = _run("losetup", "-f", "--show", str(image)).stdout.strip()
        self.loops.append((device, image))
        return device

    def write_crypttab(self, key: Path | str) -> None:
        self.crypttab.write_text(f"# test crypttab\nother UUID={UUID} none luks\n{self.name} UUID={self.luks_uuid} {key} luks\n")

    @property
    def mapped(self) -> Path:
        return self.mapper / self.name

    def stand_ins(self, variant: str = "normal", target: str | None = None) -> Commands:
        """Write the stand-in cryptdisks_start/stop (root-owned 0755 in a directory only root can write)."""
        paths = {}
        for action in ("start", "stop"):
            config = {
                "action": action,
                "crypttab": str(self.crypttab),
                "mapper_dir": str(self.mapper),
                "targets": {self.name: target or self.plain_device},
                "cryptsetup": shutil.which("cryptsetup"),
                "blkid": shutil.which("blkid"),
                "log": str(self.log),
                "variant": variant,
            }
            path = self.bin / f"cryptdisks_{action}"
            path.write_text(fake_cryptdisks.render(config))
            path.chmod(0o755)
            paths[action] = str(path)
        return Commands(cryptdisks_start=paths["start"], cryptdisks_stop=paths["stop"])

    def setup(self, variant: str = "normal", *, target: str | None = None, **disk_changes: Any) -> tuple[Disk, Settings]:
        values: dict[str, Any] = dict(
            name=self.name,
            luks_uuid=self.luks_uuid,
            mount_point=str(self.mount_point),
            mapped_device=str(self.mapped),
            repository=str(self.mount_point / "host"),
            unlock="cryptdisks",
            filesystem="ext4",
        )
        values.update(disk_changes)
        disk = Disk(**values)
        settings = Settings(
            path=None,
            commands=self.stand_ins(variant, target),
            disks=(disk,),
            state_dir=str(self.tmp / "state"),
            crypttab=str(self.crypttab),
            fstab=str(self.fstab),
        )
        return disk, settings

    # -- using -----------------------------------------------------------------

    @contextlib.contextmanager
    def opened(self, disk: Disk, settings: Settings, runner: Runner | None = None) -> Iterator[tuple[bool, bool]]:
        """unlocked then mounted on one ExitStack, as the cycle does."""
        runner = runner or Runner()
        with contextlib.ExitStack() as stack:
            unlocked_now = stack.enter_context(unlocked(disk, settings, runner, self.warnings.append))
            mounted_now = stack.enter_context(mounted(disk, settings, runner, self.warnings.append))
            yield unlocked_now, mounted_now

    def calls(self) -> list[tuple[str, int]]:
        if not self.log.exists():
            return []
        return [(call["action"], call["exit"]) for call in map(json.loads, self.log.read_text().splitlines())]

    def top(self) -> MountEntry | None:
        return top_mount(read_mountinfo(), str(self.mount_point))

    def is_unlocked(self) -> bool:
        return os.path.lexists(self.mapped)

    def device_of(self, path: str) -> str:
        return device_number(os.stat(path).st_rdev)

    def unlock_by_hand(self) -> None:
        self.mapped.symlink_to(self.plain_device)

    def mount_by_hand(self, device: str, mount_point: Path | None = None, *options: str) -> None:
        _run("mount", *options, device, str(mount_point or self.mount_point))

    def hold(self, path: Path) -> subprocess.Popen[str]:
        """A process that keeps ``path`` open for writing until killed."""
        code = "import sys, time\nf = open(sys.argv[1], 'w')\nprint('ready', flush=True)\ntime.sleep(120)\n"
        process = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
        self.processes.append(process)
        assert process.stdout is not None and process.stdout.readline().strip() == "ready"
        return process

    def release(self, process: subprocess.Popen[str]) -> None:
        process.kill()
        process.wait()

    # -- leaving nothing behind ----------------------------------------------

    def cleanup(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait()
            if process.stdout is not None:
                process.stdout.close()
        for _ in range(10):  # our mounts only: everything mounted under this test's directory, top first
            ours = [e.mount_point for e in read_mountinfo() if _within(e.mount_point, self.tmp)]
            if not ours:
                break
            for point in reversed(ours):
                _run("umount", point, check=False)
        if os.path.lexists(self.mapped):
            self.mapped.unlink()
        for device, image in reversed(self.loops):
            backing = _run("losetup", "--noheadings", "--output", "BACK-FILE", device, check=False).stdout.strip()
            if backing == str(image):  # still ours: detach it, never another's
                _run("losetup", "-d", device, check=False)
        for image in self.tmp.glob("*.img"):
            image.unlink()


@pytest.fixture
def rig(tmp_path: Path, trusted_dir: Path) -> Iterator[Rig]:
    _require_parts()
    made = Rig(tmp_path, trusted_dir)
    try:
        yield made
    finally:
        made.cleanup()


def _assert_closed(rig: Rig) -> None:
    """Locked and unmounted, nothing left on the mount point directory (the root filesystem)."""
    assert not rig.is_unlocked()
    assert rig.top() is None
    assert list(rig.mount_point.iterdir()) == []


# -- finding the disk --------------------------------------------------------


@pytest.mark.integration
def test_find_device_with_the_real_blkid(rig: Rig) -> None:
    disk, settings = rig.setup()
    assert find_device(disk, settings, Runner()) == rig.luks_device
    absent = dataclasses.replace(disk, name="gone", luks_uuid="12345678-9abc-4def-8123-456789abcdef")
    assert find_device(absent, settings, Runner()) is None
    both = dataclasses.replace(settings, disks=(absent, disk))
    assert present_disks(both, Runner()) == [(disk, rig.luks_device)]
    # A dry run still looks (blkid changes nothing).
    assert find_device(disk, settings, Runner(dry_run=True)) == rig.luks_device


@pytest.mark.integration
def test_find_device_refuses_a_cloned_uuid(rig: Rig) -> None:
    disk, settings = rig.setup()
    clone = rig.attach(rig.luks_image)  # the same header on a second device, as a cloned disk
    with pytest.raises(DiskError, match=f"several attached devices carry the LUKS UUID {rig.luks_uuid}") as caught:
        find_device(disk, settings, Runner())
    assert rig.luks_device in caught.value.message and clone in caught.value.message


@pytest.mark.integration
def test_find_device_refuses_a_uuid_that_is_not_luks(rig: Rig) -> None:
    disk, settings = rig.setup()
    ext4_uuid = _run("blkid", "-o", "value", "-s", "UUID", rig.plain_device).stdout.strip()
    plain = dataclasses.replace(disk, luks_uuid=ext4_uuid)
    with pytest.raises(DiskError, match=f"belongs to {rig.plain_device}, which is ext4, not a LUKS container"):
        find_device(plain, settings, Runner())


# -- leaving it as found -----------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("through", ["filesystem", "fstab"])
def test_found_locked_is_unlocked_mounted_and_closed_again(rig: Rig, through: str) -> None:
    disk, settings = rig.setup(filesystem="ext4" if through == "filesystem" else None)
    with rig.opened(disk, settings) as (unlocked_now, mounted_now):
        assert (unlocked_now, mounted_now) == (True, True)
        assert rig.is_unlocked()
        mount = verify_mount(disk)
        assert (mount.fstype, mount.device) == ("ext4", rig.device_of(rig.plain_device))
        (rig.mount_point / "written.txt").write_text("on the disk\n")
    _assert_closed(rig)
    assert rig.calls() == [("start", 0), ("stop", 0)]
    assert rig.warnings == []
    # What was written went to the disk, not to the mount point directory.
    check = rig.tmp / "check"
    check.mkdir()
    rig.mount_by_hand(rig.plain_device, check, "-o", "ro")
    assert (check / "written.txt").read_text() == "on the disk\n"


@pytest.mark.integration
def test_a_failing_body_still_closes_in_reverse_order(rig: Rig) -> None:
    disk, settings = rig.setup()
    with pytest.raises(RuntimeError, match="rsync died"):
        with rig.opened(disk, settings):
            raise RuntimeError("rsync died")
    _assert_closed(rig)
    # The stand-in's stop refuses while mounted: a clean stop proves unmount came first.
    assert rig.calls() == [("start", 0), ("stop", 0)]
    assert rig.warnings == []


@pytest.mark.integration
def test_found_unlocked_stays_unlocked(rig: Rig) -> None:
    disk, settings = rig.setup()
    rig.unlock_by_hand()
    with rig.opened(disk, settings) as opened:
        assert opened == (False, True)
        verify_mount(disk)
    assert rig.is_unlocked()
    assert rig.top() is None
    assert rig.calls() == []


@pytest.mark.integration
def test_found_mounted_stays_mounted(rig: Rig) -> None:
    disk, settings = rig.setup()
    rig.unlock_by_hand()
    rig.mount_by_hand(str(rig.mapped))
    before = rig.top()
    with rig.opened(disk, settings) as opened:
        assert opened == (False, False)
        verify_mount(disk)
    assert rig.is_unlocked()
    assert rig.top() == before is not None
    assert rig.calls() == []


# -- failure at each step -------------------------------------------------------


@pytest.mark.integration
def test_wrong_key_unlocks_nothing(rig: Rig) -> None:
    wrong = rig.key.with_name("wrong.key")
    wrong.write_bytes(secrets.token_bytes(64))
    wrong.chmod(0o600)
    rig.write_crypttab(wrong)
    disk, settings = rig.setup()
    with pytest.raises(DiskError, match=f"unlocking {NAME} with .* failed \\(exit status 1\\).*nothing was unlocked") as caught:
        with rig.opened(disk, settings):
            pytest.fail("the body must not run")
    assert caught.value.step == "unlock"
    assert "No key available with this passphrase" in caught.value.message
    _assert_closed(rig)
    assert rig.calls() == [("start", 1)]


@pytest.mark.integration
def test_mapping_missing_after_a_successful_unlock(rig: Rig) -> None:
    disk, settings = rig.setup("maps-nothing")
    with pytest.raises(DiskError, match=f"reported success but {rig.mapped} does not exist"):
        with rig.opened(disk, settings):
            pytest.fail("the body must not run")
    _assert_closed(rig)
    assert rig.calls() == [("start", 0), ("stop", 0)]  # stopped again, in case it unlocked elsewhere


@pytest.mark.integration
def test_a_half_done_unlock_is_undone(rig: Rig) -> None:
    disk, settings = rig.setup("map-then-fail")
    with pytest.raises(DiskError, match="failed after mapping"):
        with rig.opened(disk, settings):
            pytest.fail("the body must not run")
    _assert_closed(rig)
    assert rig.calls() == [("start", 1), ("stop", 0)]


@pytest.mark.integration
def test_mount_failure_with_a_bad_filesystem_type_locks_again(rig: Rig) -> None:
    disk, settings = rig.setup(filesystem="xfs")
    with pytest.raises(DiskError, match=f"mounting {rig.mapped} on {rig.mount_point} failed") as caught:
        with rig.opened(disk, settings):
            pytest.fail("the body must not run")
    assert caught.value.step == "mount"
    _assert_closed(rig)
    assert rig.calls() == [("start", 0), ("stop", 0)]


@pytest.mark.integration
def test_mount_failure_on_a_corrupt_image_locks_again(rig: Rig) -> None:
    corrupt = rig.attach(rig.image("corrupt.img", None))  # zeros: no filesystem at all
    disk, settings = rig.setup(target=corrupt, filesystem=None)  # through the fstab line (ext4)
    with pytest.raises(DiskError, match="failed") as caught:
        with rig.opened(disk, settings):
            pytest.fail("the body must not run")
    assert caught.value.step == "mount"
    _assert_closed(rig)
    assert rig.calls() == [("start", 0), ("stop", 0)]


@pytest.mark.integration
def test_fstab_without_a_line_for_the_mount_point(rig: Rig) -> None:
    rig.fstab.write_text("# nothing for the backup disk\n/dev/sdz1 /elsewhere ext4 noauto 0 0\n")
    disk, settings = rig.setup(filesystem=None)
    with pytest.raises(DiskError, match=f"{rig.fstab} has no line for {rig.mount_point}: add one .*noauto.* or set filesystem"):
        with rig.opened(disk, settings):
            pytest.fail("the body must not run")
    _assert_closed(rig)
    assert rig.calls() == [("start", 0), ("stop", 0)]


@pytest.mark.integration
def test_ntfs_is_refused_and_closed_again(rig: Rig) -> None:
    _require_parts("mkntfs", "mount.ntfs-3g")
    ntfs = rig.attach(rig.image("ntfs.img", "ntfs"))
    disk, settings = rig.setup(target=ntfs, filesystem="ntfs-3g")
    with pytest.raises(WrongDiskError, match="holds fuseblk, .*format .* as ext4, xfs or btrfs"):
        with rig.opened(disk, settings):
            verify_mount(disk)
            pytest.fail("nothing may be written to an NTFS disk")
    _assert_closed(rig)
    assert rig.calls() == [("start", 0), ("stop", 0)]


@pytest.mark.integration
def test_vfat_is_refused_and_closed_again(rig: Rig, request: pytest.FixtureRequest) -> None:
    with open("/proc/filesystems", encoding="ascii") as handle:
        kernel = {line.split()[-1] for line in handle if line.strip()}
    if "vfat" not in kernel:
        request.applymarker(pytest.mark.may_skip)
        pytest.skip(reason="this kernel has no vfat driver (not in /proc/filesystems); NTFS through FUSE is tested instead")
    _require_parts("mkfs.vfat")
    vfat = rig.attach(rig.image("vfat.img", "vfat"))
    disk, settings = rig.setup(target=vfat, filesystem="vfat")
    with pytest.raises(WrongDiskError, match="holds vfat"):
        with rig.opened(disk, settings):
            verify_mount(disk)
    _assert_closed(rig)


@pytest.mark.integration
def test_another_device_at_the_mount_point_is_left_alone(rig: Rig) -> None:
    other = rig.attach(rig.image("other.img", "ext4"))
    rig.mount_by_hand(other)
    disk, settings = rig.setup()
    with pytest.raises(WrongDiskError, match=f"already mounted from {other} \\(ext4, device {rig.device_of(other)}\\)") as caught:
        with rig.opened(disk, settings):
            pytest.fail("the body must not run")
    assert caught.value.step == "mount"
    top = rig.top()
    assert top is not None and top.device == rig.device_of(other)  # still mounted, untouched
    assert not rig.is_unlocked()  # what this run unlocked is locked again
    assert rig.calls() == [("start", 0), ("stop", 0)]


@pytest.mark.integration
def test_busy_unmount_leaves_the_disk_mounted_and_unlocked(rig: Rig) -> None:
    disk, settings = rig.setup()
    started = time.monotonic()
    with pytest.raises(DiskBusyError) as caught:
        with rig.opened(disk, settings):
            holder = rig.hold(rig.mount_point / "open.txt")
    took = time.monotonic() - started
    message = caught.value.message
    assert f"pid {holder.pid} (" in message
    assert "left mounted and unlocked" in message
    assert f"umount {rig.mount_point}" in message and f"cryptdisks_stop {NAME}" in message
    assert caught.value.step == "unmount"
    assert 2.5 < took < 8
    top = rig.top()
    assert top is not None and top.device == rig.device_of(rig.plain_device)
    assert rig.is_unlocked()
    assert rig.calls() == [("start", 0)]  # never locked under the mount
    assert any("still mounted" in warning and "leaving" in warning for warning in rig.warnings)
    # Released, the user's two commands finish the job.
    rig.release(holder)
    _run("umount", str(rig.mount_point))
    _run(settings.commands.cryptdisks_stop, NAME)
    _assert_closed(rig)


@pytest.mark.integration
def test_busy_unmount_after_a_failure_keeps_the_first_error(rig: Rig) -> None:
    disk, settings = rig.setup()
    with pytest.raises(RuntimeError, match="rsync died"):
        with rig.opened(disk, settings):
            rig.hold(rig.mount_point / "open.txt")
            raise RuntimeError("rsync died")
    assert any("cannot unmount" in warning and "busy" in warning for warning in rig.warnings)
    assert rig.top() is not None and rig.is_unlocked()
    assert rig.calls() == [("start", 0)]


@pytest.mark.integration
def test_holders_names_processes_using_the_mount(rig: Rig) -> None:
    rig.unlock_by_hand()
    rig.mount_by_hand(str(rig.mapped))
    (rig.mount_point / "dir").mkdir()
    in_dir = subprocess.Popen(["sleep", "60"], cwd=rig.mount_point / "dir", text=True)
    rig.processes.append(in_dir)
    with_file = rig.hold(rig.mount_point / "dir" / "file.txt")
    found = dict(holders(str(rig.mount_point)))
    assert found.get(in_dir.pid) == "sleep"
    assert with_file.pid in found
    assert os.getpid() not in found
    assert holders(str(rig.tmp / "no-such-dir")) == []


@pytest.mark.integration
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_a_key_file_others_can_read_is_refused(rig: Rig, mode: int) -> None:
    rig.key.chmod(mode)
    disk, settings = rig.setup()
    with pytest.raises(UnsafeKeyFileError, match=f"readable or writable by group or others \\(mode {mode:04o}\\).*nothing was unlocked"):
        with rig.opened(disk, settings):
            pytest.fail("the body must not run")
    _assert_closed(rig)
    assert rig.calls() == []


@pytest.mark.integration
def test_a_key_file_not_owned_by_root_is_refused(rig: Rig) -> None:
    os.chown(rig.key, 65534, 0)
    disk, settings = rig.setup()
    with pytest.raises(UnsafeKeyFileError, match="owned by uid 65534, not root"):
        with rig.opened(disk, settings):
            pytest.fail("the body must not run")
    assert rig.calls() == []
    assert not rig.is_unlocked()


@pytest.mark.integration
def test_a_key_file_on_the_backup_disk_is_refused(rig: Rig) -> None:
    on_disk = rig.mount_point / "keys" / "disk.key"
    on_disk.parent.mkdir()
    shutil.copy(rig.key, on_disk)
    on_disk.chmod(0o400)
    rig.write_crypttab(on_disk)
    disk, settings = rig.setup()
    with pytest.raises(UnsafeKeyFileError, match="lies on the backup disk itself"):
        with rig.opened(disk, settings):
            pytest.fail("the body must not run")
    assert rig.calls() == []
    assert not rig.is_unlocked() and rig.top() is None


@pytest.mark.integration
def test_a_missing_crypttab_line_says_what_to_add(rig: Rig) -> None:
    rig.crypttab.write_text("# empty\n")
    disk, settings = rig.setup()
    with pytest.raises(DiskError, match=f"has no line for the backup disk {NAME}: add one such as `{NAME} UUID={rig.luks_uuid} "):
        with rig.opened(disk, settings):
            pytest.fail("the body must not run")
    assert rig.calls() == []


@pytest.mark.integration
def test_a_passphrase_line_is_not_typed_by_cryptdisks(rig: Rig) -> None:
    rig.write_crypttab("none")
    disk, settings = rig.setup()
    with pytest.raises(DiskError, match=f"gives no key file for {NAME} .*unlock it yourself first \\(sudo cryptdisks_start {NAME}"):
        with rig.opened(disk, settings):
            pytest.fail("the body must not run")
    assert rig.calls() == []
    # Unlocked by hand beforehand, the same disk is used, and left unlocked.
    rig.unlock_by_hand()
    with rig.opened(disk, settings) as opened:
        assert opened == (False, True)
    assert rig.is_unlocked() and rig.top() is None
    assert rig.calls() == []


@pytest.mark.integration
def test_a_crypttab_line_for_another_uuid_is_refused(rig: Rig) -> None:
    rig.crypttab.write_text(f"{NAME} UUID={UUID} {rig.key} luks\n")
    disk, settings = rig.setup()
    with pytest.raises(DiskError, match=f"unlocks {NAME} from UUID={UUID}, but the config gives its LUKS UUID as {rig.luks_uuid}"):
        with rig.opened(disk, settings):
            pytest.fail("the body must not run")
    assert rig.calls() == []


@pytest.mark.integration
@pytest.mark.parametrize(
    ("variant", "warning"),
    [("stop-fails", "locking backup-test failed (exit status 1)"), ("stop-leaves-mapping", "reported success but")],
)
def test_a_failed_lock_is_a_warning_that_says_how_to_finish(rig: Rig, variant: str, warning: str) -> None:
    disk, settings = rig.setup(variant)
    with rig.opened(disk, settings):
        pass
    assert rig.top() is None  # unmounted
    assert rig.is_unlocked()
    assert len(rig.warnings) == 1 and warning in rig.warnings[0]
    assert f"lock it with `{settings.commands.cryptdisks_stop} {NAME}`" in rig.warnings[0]


@pytest.mark.integration
def test_a_dry_run_neither_unlocks_nor_mounts(rig: Rig) -> None:
    disk, settings = rig.setup()
    with pytest.raises(DiskError, match="dry run changes nothing"):
        with rig.opened(disk, settings, Runner(dry_run=True)):
            pytest.fail("the body must not run")
    rig.unlock_by_hand()
    with pytest.raises(DiskError, match="not mounted and a dry run changes nothing"):
        with rig.opened(disk, settings, Runner(dry_run=True)):
            pytest.fail("the body must not run")
    assert rig.calls() == [] and rig.top() is None


# -- the real unlock, where device-mapper exists ---------------------------------


@pytest.mark.integration
@pytest.mark.may_skip
def test_real_cryptdisks_start_where_device_mapper_exists(rig: Rig) -> None:
    real_start, real_stop = shutil.which("cryptdisks_start"), shutil.which("cryptdisks_stop")
    if real_start is None or real_stop is None:
        pytest.skip(reason="cryptdisks_start is not installed (Debian package cryptsetup)")
    name = f"ba-test-{secrets.token_hex(4)}"
    probe = _run("cryptsetup", "open", "--key-file", str(rig.key), rig.luks_device, name, check=False)
    if probe.returncode != 0:
        if "device-mapper" in probe.stderr:
            pytest.skip(reason="this kernel has no device-mapper: cryptsetup open fails with Cannot initialize device-mapper")
        pytest.fail(f"cryptsetup open failed: {probe.stderr}")
    mapped = f"/dev/mapper/{name}"
    try:
        _run("mkfs.ext4", "-q", mapped)
        _run("cryptsetup", "close", name)
        rig.crypttab.write_text(f"{name} UUID={rig.luks_uuid} {rig.key} luks\n")
        for action, real in (("start", real_start), ("stop", real_stop)):
            wrapper = rig.bin / f"real_cryptdisks_{action}"  # the real program, reading the test's crypttab
            wrapper.write_text(f"#!/bin/sh\nTABFILE={rig.crypttab} exec {real} \"$@\"\n")
            wrapper.chmod(0o755)
        disk = Disk(
            name=name,
            luks_uuid=rig.luks_uuid,
            mount_point=str(rig.mount_point),
            mapped_device=mapped,
            repository=str(rig.mount_point / "host"),
            unlock="cryptdisks",
            filesystem="ext4",
        )
        commands = Commands(cryptdisks_start=str(rig.bin / "real_cryptdisks_start"), cryptdisks_stop=str(rig.bin / "real_cryptdisks_stop"))
        settings = Settings(path=None, commands=commands, disks=(disk,), crypttab=str(rig.crypttab), fstab=str(rig.fstab))
        with rig.opened(disk, settings) as opened:
            assert opened == (True, True)
            assert verify_mount(disk).fstype == "ext4"
        assert not os.path.exists(mapped)
        assert rig.top() is None
        assert rig.warnings == []
    finally:
        if os.path.exists(mapped):
            _run("umount", str(rig.mount_point), check=False)
            _run("cryptsetup", "close", name, check=False)


# -- crypttab-examples/ ----------------------------------------------------------

EXAMPLES = Path(__file__).resolve().parent.parent / "crypttab-examples"
EXAMPLE_DIRS = ["key-file", "passphrase", "luks2-by-uuid", "systemd", "btrfs"]


def _example(directory: str) -> tuple[CrypttabEntry, list[FstabEntry], Disk]:
    from agent.config.load import tomllib  # tomllib, or tomli before Python 3.11
    from agent.config.validate import settings_from_mapping

    path = EXAMPLES / directory
    crypttab = parse_crypttab((path / "crypttab").read_text())
    assert len(crypttab) == 1, crypttab
    config = settings_from_mapping(tomllib.loads((path / "config.toml").read_text()), str(path / "config.toml"))
    assert len(config.disks) == 1
    return next(iter(crypttab.values())), parse_fstab((path / "fstab").read_text()), config.disks[0]


@pytest.mark.parametrize("directory", EXAMPLE_DIRS)
def test_each_example_pair_agrees_with_its_config(directory: str) -> None:
    line, fstab, disk = _example(directory)
    assert line.name == disk.name
    assert line.device.removeprefix("UUID=").removeprefix("/dev/disk/by-uuid/") == disk.luks_uuid
    assert "luks" in line.options and "noauto" in line.options
    if directory == "passphrase":
        assert line.key_file is None
    else:
        assert line.key_file == f"/etc/backup-agent/keys/{disk.name}.key"
    if disk.filesystem is None:
        entry = fstab_entry_for(fstab, disk.mount_point)
        assert entry is not None and entry.device == disk.mapped_device == f"/dev/mapper/{disk.name}"
        assert {"noauto", "nofail"} <= set(entry.options)
        assert entry.fstype not in UNSUPPORTED_FILESYSTEMS
    else:
        assert fstab == []  # the line is there only as a comment
    assert disk.unlock in ("cryptdisks", "systemd", "auto")
    if directory == "systemd":
        assert disk.unlock == "systemd"


def test_examples_readme_has_the_key_file_commands() -> None:
    readme = (EXAMPLES / "README.md").read_text()
    for command in (
        "dd if=/dev/urandom of=/etc/backup-agent/keys/backup1.key bs=64 count=1",
        "chmod 0400 /etc/backup-agent/keys/backup1.key",
        "chown root:root /etc/backup-agent/keys/backup1.key",
        "cryptsetup luksAddKey",
        "blkid",
        "lsblk -f",
        "backup-agent init --disk backup1",
    ):
        assert command in readme, command
    for directory in EXAMPLE_DIRS:
        assert f"]({directory}/)" in readme


@pytest.mark.integration
def test_the_key_file_example_works_with_real_mount(rig: Rig) -> None:
    """The key-file pair, with this test's UUID, key, device and mount point put in, takes the disk round."""
    line, _fstab, example = _example("key-file")
    crypttab = (EXAMPLES / "key-file" / "crypttab").read_text()
    fstab = (EXAMPLES / "key-file" / "fstab").read_text()
    for old, new in (
        (example.luks_uuid, rig.luks_uuid),
        (str(line.key_file), str(rig.key)),
        (example.mapped_device, str(rig.mapped)),
        (example.mount_point, str(rig.mount_point)),
        (example.name, NAME),
    ):
        crypttab, fstab = crypttab.replace(old, new), fstab.replace(old, new)
    rig.crypttab.write_text(crypttab)
    rig.fstab.write_text(fstab)
    disk, settings = rig.setup(filesystem=None)
    with rig.opened(disk, settings) as opened:
        assert opened == (True, True)
        assert verify_mount(disk).fstype == "ext4"
    _assert_closed(rig)
    assert rig.calls() == [("start", 0), ("stop", 0)]
