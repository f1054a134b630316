"""The package state stored with every snapshot (``.backup-agent/packages/``) and ``backup-agent packages``.

Against this machine's real dpkg database: a tiny package, built here with
dpkg-deb (faster than fetching one with apt, and harmless), is installed
between two snapshots and removed before a third. The other managers'
parsers are checked on the text their programs print; the capture itself
(skip when unchanged, links, refusing a linked directory of a hostile
disk) is checked through the plugin interface with a manager written here
whose "database" is a file of the test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from agent.cli import build_parser, main, through_sudo_refusal
from agent.config.load import load_settings
from agent.config.model import Settings, packages_wanted
from agent.config.validate import settings_from_mapping
from agent.core.commands import Runner
from agent.core.errors import ConfigError
from agent.core.events import Emitter
from agent.engine.cycle import Cycle, Request
from agent.engine.sysstate import files
from agent.engine.sysstate.managers import Manager, Output, all_managers, flatpak, pacman, rpm, snap
from agent.engine.sysstate.packages import capture_manager, compare, read_inventories
from agent.repository.store import Repository

FAST = '[backup]\nionice = "none"\nnice = 0\n'
NO_ROTATION = frozenset({"backup", "snapshot"})  # several snapshots a second: rotation would thin them out


# --------------------------------------------------------------------------
# Configuration (pure)


def test_packages_are_captured_by_default_only_for_a_backup_of_the_whole_system() -> None:
    default = Settings(path=None)
    assert packages_wanted(default, "/") and not packages_wanted(default, "/srv/data")
    on = settings_from_mapping({"packages": {"enabled": True}}, "c.toml")
    off = settings_from_mapping({"packages": {"enabled": False}}, "c.toml")
    assert packages_wanted(on, "/srv/data") and not packages_wanted(off, "/")
    with pytest.raises(ConfigError, match=r"packages\.enabled: got a string"):
        settings_from_mapping({"packages": {"enabled": "yes"}}, "c.toml")
    with pytest.raises(ConfigError, match=r"packages\.managers: unknown key"):
        settings_from_mapping({"packages": {"managers": ["dpkg"]}}, "c.toml")


# --------------------------------------------------------------------------
# The plugins: found by module, and their parsers (pure)


def test_every_manager_is_found_by_its_module() -> None:
    assert [m.name for m in all_managers()] == ["dpkg", "flatpak", "pacman", "rpm", "snap"]
    for manager in all_managers():
        assert manager.program.startswith("/")
        assert all(o.argv[0].startswith("/") and files.SAFE_NAME.fullmatch(o.file) for o in manager.outputs)


def test_rpm_pacman_flatpak_and_snap_read_what_their_programs_print() -> None:
    texts = {rpm.INSTALLED: "bash\t0:5.2.15-3.fc39.x86_64\nvim-enhanced\t2:9.0-1.fc39.x86_64\n", rpm.MANUAL: "vim-enhanced\n"}
    assert rpm.installed(texts) == {"bash": "0:5.2.15-3.fc39.x86_64", "vim-enhanced": "2:9.0-1.fc39.x86_64"}
    assert rpm.reinstall(texts) == ("dnf install vim-enhanced",)
    assert rpm.manual({rpm.INSTALLED: texts[rpm.INSTALLED]}) == ("bash", "vim-enhanced")  # without dnf: all

    arch = {pacman.INSTALLED: "base 3-2\nlinux 6.6.1.arch1-1\nyay 12.1-1\n", pacman.EXPLICIT: "base\nyay\n"}
    assert pacman.installed(arch)["linux"] == "6.6.1.arch1-1"
    assert pacman.reinstall(arch) == ("pacman -S --needed base yay",)

    apps = "org.gimp.GIMP\t2.10.36\tstable\tflathub\n"
    flat = {flatpak.INSTALLED: apps + "org.gnome.Platform\t\t45\tflathub\n", flatpak.APPS: apps}
    assert flatpak.installed(flat) == {"org.gimp.GIMP": "2.10.36", "org.gnome.Platform": "45"}
    assert flatpak.reinstall(flat) == ("flatpak install --system --noninteractive flathub org.gimp.GIMP//stable",)

    listing = (
        "Name    Version   Rev    Tracking       Publisher   Notes\n"
        "core22  20231123  1033   latest/stable  canonical✓  base\n"
        "code    1.85      150    latest/stable  vscode✓     classic\n"
        "snapd   2.60      20290  latest/stable  canonical✓  snapd\n"
        "hello   2.10      42     -              canonical✓  -\n"
    )
    snaps = {snap.INSTALLED: listing}
    assert snap.manual(snaps) == ("code", "hello")
    assert snap.reinstall(snaps) == ("snap install code --channel=latest/stable --classic", "snap install hello")


# --------------------------------------------------------------------------
# The capture through the plugin interface, with a manager of the test


def _stand_in(database: Path, log: Path) -> Manager:
    """A manager whose database is a file of the test; its one output appends to ``log`` when it runs."""
    script = f'echo run >> {log}; cat {database}'
    return Manager(
        name="standin",
        program="/bin/sh",
        database=(str(database),),
        outputs=(Output("list.txt", ("/bin/sh", "-c", script)),),
        installed=lambda texts: dict(line.split() for line in texts.get("list.txt", "").splitlines()),
        manual=lambda texts: (),
        reinstall=lambda texts: (),
        archive=str(database.parent / "db"),
        archive_skip=("huge",),
    )


def _capture(manager: Manager, target: Path, previous: Path | None) -> dict[str, Any]:
    warnings: list[str] = []
    target.mkdir(exist_ok=True)
    with files.directory(str(target), "pk", create=0o755) as out, (
        files.directory(str(previous), "pk") if previous else contextlib.nullcontext()
    ) as before:
        assert out is not None
        record = capture_manager(manager, Runner(), out, before, warnings.append)
    assert warnings == []
    return record


def test_the_capture_runs_again_only_when_the_database_changed(tmp_path: Path) -> None:
    database, log = tmp_path / "status", tmp_path / "ran"
    database.write_text("alpha 1\n")
    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "kept").write_text("k")
    (tmp_path / "db" / "huge").write_text("derivable")
    manager = _stand_in(database, log)
    one, two, three = (tmp_path / n for n in ("one", "two", "three"))
    first = _capture(manager, one, None)
    second = _capture(manager, two, one)
    assert (first["unchanged"], second["unchanged"]) == (False, True)
    assert log.read_text() == "run\n"  # the second ran nothing
    for name in ("list.txt", "database.tar.gz", "stamp.json"):
        assert (two / "pk" / name).stat().st_ino == (one / "pk" / name).stat().st_ino
    names = subprocess.run(["tar", "-tzf", str(one / "pk" / "database.tar.gz")], capture_output=True, text=True, check=True)
    assert names.stdout.split() == ["db/", "db/kept"]  # the skipped entry is left out

    database.write_text("alpha 1\nbeta 2\n")
    third = _capture(manager, three, two)
    assert third["unchanged"] is False and log.read_text() == "run\nrun\n"
    assert (three / "pk" / "list.txt").read_text() == "alpha 1\nbeta 2\n"


def test_the_lists_are_readable_by_all_whatever_the_umask(tmp_path: Path) -> None:
    database, log = tmp_path / "status", tmp_path / "ran"
    database.write_text("alpha 1\n")
    old = os.umask(0o077)  # a root service's umask may be this strict
    try:
        _capture(_stand_in(database, log), tmp_path / "one", None)
    finally:
        os.umask(old)
    assert (tmp_path / "one" / "pk").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "one" / "pk" / "list.txt").stat().st_mode & 0o777 == 0o644


def test_a_capture_that_missed_a_list_is_tried_again_though_the_database_did_not_change(tmp_path: Path) -> None:
    database, log = tmp_path / "status", tmp_path / "ran"
    database.write_text("alpha 1\n")
    broken = dataclasses.replace(
        _stand_in(database, log), outputs=(Output("list.txt", ("/bin/sh", "-c", f"echo run >> {log}; exit 3")),)
    )
    warnings: list[str] = []
    (tmp_path / "one").mkdir()
    with files.directory(str(tmp_path / "one"), create=0o755) as out:
        assert out is not None
        assert capture_manager(broken, Runner(), out, None, warnings.append)["complete"] is False
    assert any("standin package list list.txt was not captured" in w for w in warnings)
    second = tmp_path / "two"
    second.mkdir()
    with files.directory(str(tmp_path / "one"), create=0o755) as before, files.directory(str(second), create=0o755) as out:
        assert out is not None
        assert capture_manager(_stand_in(database, log), Runner(), out, before, warnings.append)["unchanged"] is False


@pytest.mark.parametrize(
    ("argv", "refused"),
    [
        (["packages", "--disk", "backup1", "--diff", "A", "B", "--json"], None),
        (["packages", "--snapshot", "A"], None),
        (["packages", "--repository", "/home/me/x"], "--repository"),
    ],
)
def test_packages_through_sudo_only_reads_a_configured_disk(argv: list[str], refused: str | None) -> None:
    args = build_parser().parse_args(argv)
    refusal = through_sudo_refusal(args)
    assert (refusal is None) if refused is None else (refusal is not None and refused in refusal)


def test_a_linked_directory_on_the_disk_is_never_followed_to_skip_a_capture(tmp_path: Path) -> None:
    database, log = tmp_path / "status", tmp_path / "ran"
    database.write_text("alpha 1\n")
    manager = _stand_in(database, log)
    real, hostile, new = tmp_path / "real", tmp_path / "hostile", tmp_path / "new"
    _capture(manager, real, None)
    hostile.mkdir()
    (hostile / "pk").symlink_to(real / "pk")  # a previous snapshot whose directory is a link elsewhere
    assert _capture(manager, new, hostile)["unchanged"] is False
    assert log.read_text() == "run\nrun\n"
    assert (new / "pk" / "list.txt").stat().st_ino != (real / "pk" / "list.txt").stat().st_ino


# --------------------------------------------------------------------------
# The real dpkg database


def _dpkg(*args: str) -> None:
    """dpkg as root; another dpkg or apt run on this machine holds its lock for a while: wait for it."""
    for _ in range(60):
        done = subprocess.run(["/usr/bin/dpkg", *args], capture_output=True, text=True)
        if done.returncode == 0:
            return
        if "lock" not in done.stderr:
            raise AssertionError(f"dpkg {' '.join(args)} failed: {done.stderr}")
        time.sleep(0.5)
    raise AssertionError(f"dpkg {' '.join(args)}: its lock stayed taken")


@pytest.fixture
def tiny_package(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A package built with dpkg-deb that installs one file; purged afterwards whatever happened."""
    if os.geteuid() != 0 or shutil.which("dpkg-deb") is None or not os.path.isfile("/var/lib/dpkg/status"):
        pytest.skip(reason="needs root and dpkg (a Debian system) to install a package")
    name = f"backup-agent-test-{uuid.uuid4().hex[:8]}"
    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "usr" / "share" / name).mkdir(parents=True)
    (root / "usr" / "share" / name / "README").write_text("installed by backup-agent's tests; removed by them\n")
    (root / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: 1.0-1\nArchitecture: all\nMaintainer: tests <tests@localhost>\n"
        "Description: a package the tests install and remove\n"
    )
    deb = tmp_path / f"{name}.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(root), str(deb)], check=True, capture_output=True)
    try:
        yield name, deb
    finally:
        _dpkg("--purge", name)


def _snapshot(settings: Any, source: Path, repo: Path) -> str:
    request = Request(settings=settings, source=str(source), repository=str(repo), steps=NO_ROTATION)
    name = Cycle(request, Emitter(), Runner()).run().snapshot
    assert name is not None
    return name


@pytest.mark.integration
def test_a_package_installed_and_removed_between_snapshots_shows_in_the_lists_and_the_diff(
    tmp_path: Path, rsync_path: str, tiny_package: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    package, deb = tiny_package
    source, repo, config = tmp_path / "source", tmp_path / "repo", tmp_path / "config.toml"
    source.mkdir()
    config.write_text(FAST + f'[commands]\nrsync = "{rsync_path}"\n[packages]\nenabled = true\n')
    settings = load_settings(str(config))

    before = _snapshot(settings, source, repo)
    unchanged = _snapshot(settings, source, repo)
    _dpkg("--install", str(deb))
    installed = _snapshot(settings, source, repo)
    _dpkg("--purge", package)
    removed = _snapshot(settings, source, repo)

    opened = Repository.open(str(repo))
    state = {name: (opened.read_metadata(name) or {})["system_state"]["packages"]["dpkg"] for name in (before, unchanged, installed)}
    assert [state[n]["unchanged"] for n in (before, unchanged, installed)] == [False, True, False]
    lists = {name: repo / "snapshots" / name / ".backup-agent" / "packages" / "dpkg" for name in (before, unchanged, installed)}
    assert (lists[unchanged] / "installed.tsv").stat().st_ino == (lists[before] / "installed.tsv").stat().st_ino
    assert (lists[installed] / "installed.tsv").stat().st_ino != (lists[before] / "installed.tsv").stat().st_ino
    # The selections and the database archive are the real ones.
    assert [package, "install"] in [line.split() for line in (lists[installed] / "selections.txt").read_text().splitlines()]
    members = subprocess.run(["tar", "-tzf", str(lists[installed] / "database.tar.gz")], capture_output=True, text=True, check=True)
    assert f"dpkg/info/{package}.list" in members.stdout.split() and "dpkg/status" in members.stdout.split()
    assert "dpkg/available" not in members.stdout.split()

    (a, b, c) = (read_inventories(str(repo / "snapshots" / n)) for n in (before, installed, removed))
    added, gone = compare(a, b)[0], compare(b, c)[0]
    assert (added.manager, added.added, added.removed) == ("dpkg", {package: "1.0-1"}, {})
    assert package in added.manual_added
    assert (gone.added, gone.removed) == ({}, {package: "1.0-1"})

    capsys.readouterr()
    assert main(["packages", "--repository", str(repo), "--diff", before, installed]) == 0
    shown = capsys.readouterr().out
    assert f"+ {package} 1.0-1" in shown and "dpkg: 1 added, 0 removed, 0 changed version" in shown
    assert main(["packages", "--repository", str(repo), "--snapshot", installed]) == 0
    listing = capsys.readouterr().out
    assert "apt-get update" in listing and package in listing.split("apt-get install", 1)[1]
    assert main(["packages", "--repository", str(repo), "--json", "--diff", installed, removed]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["managers"][0]["removed"] == {package: "1.0-1"}


@pytest.mark.integration
def test_a_snapshot_without_package_lists_is_one_clear_line(
    tmp_path: Path, rsync_path: str, capsys: pytest.CaptureFixture[str]
) -> None:
    source, repo, config = tmp_path / "source", tmp_path / "repo", tmp_path / "config.toml"
    source.mkdir()
    config.write_text(FAST + f'[commands]\nrsync = "{rsync_path}"\n')  # a source other than /: off by default
    name = _snapshot(load_settings(str(config)), source, repo)
    assert not (repo / "snapshots" / name / ".backup-agent").exists()
    assert main(["packages", "--repository", str(repo)]) == 2
    assert f"snapshot {name} holds no package lists" in capsys.readouterr().err
    assert main(["packages", "--repository", str(repo), "--snapshot", "2001-01-01T00-00-00+0000"]) == 2
    assert "no snapshot is named 2001-01-01T00-00-00+0000" in capsys.readouterr().err
