"""Shared fixtures, and the rule that CI must not skip integration tests.

CI (``.ci/run``) sets ``BACKUP_AGENT_NO_SKIP=1``: there the machine has every
part (root, rsync, loop devices, udev), so a skipped test means a part went
missing, and that fails the run. A test that may legitimately skip even there
(e.g. one that needs device-mapper, which this kernel lacks) says so with
``@pytest.mark.may_skip``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Generator

import pytest

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "may_skip: this test may skip even in CI, for the reason it gives")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if (
        report.skipped
        and os.environ.get("BACKUP_AGENT_NO_SKIP") == "1"
        and item.get_closest_marker("may_skip") is None
        and not hasattr(report, "wasxfail")
    ):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped where every part should exist (BACKUP_AGENT_NO_SKIP=1): {reason}"


@pytest.fixture(autouse=True, scope="session")
def private_runtime_dir(tmp_path_factory: pytest.TempPathFactory) -> Generator[Path, None, None]:
    """Tests take their machine lock in a directory of their own, never /run's."""
    path = tmp_path_factory.mktemp("runtime")
    previous = os.environ.get("BACKUP_AGENT_RUNTIME_DIR")
    os.environ["BACKUP_AGENT_RUNTIME_DIR"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("BACKUP_AGENT_RUNTIME_DIR", None)
    else:
        os.environ["BACKUP_AGENT_RUNTIME_DIR"] = previous


@pytest.fixture
def rsync_path() -> str:
    path = shutil.which("rsync")
    if path is None:
        pytest.skip(reason="rsync is not installed: run scripts/test, which installs it")
    return path


@pytest.fixture
def cli_argv() -> list[str]:
    """argv prefix that runs this checkout's CLI in a subprocess."""
    return [sys.executable, "-m", "agent.cli"]


def _only_root_can_write(path: str) -> bool:
    """True when path (no symbolic link in it) and every directory above it are root's and closed to others."""
    current = path
    while True:
        info = os.lstat(current)
        if stat.S_ISLNK(info.st_mode) or info.st_uid != 0 or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return False
        if current == "/":
            return True
        current = os.path.dirname(current)


def _trusted_base() -> str | None:
    """``<root's home>/.cache/backup-agent-tests``, made 0755 where missing, if only root can write it."""
    homes = [os.path.expanduser("~"), pwd.getpwuid(0).pw_dir, "/root"]
    for home in dict.fromkeys(os.path.realpath(home) for home in homes if os.path.isabs(home)):
        if not os.path.isdir(home) or not _only_root_can_write(home):
            continue
        base = home
        for part in (".cache", "backup-agent-tests"):
            base = os.path.join(base, part)
            try:
                os.mkdir(base, 0o755)
                os.chmod(base, 0o755)  # whatever the umask
            except FileExistsError:
                pass
        if _only_root_can_write(base):
            return base
    return None


@pytest.fixture
def trusted_dir(tmp_path: Path, request: pytest.FixtureRequest) -> Generator[Path, None, None]:
    """A fresh directory for stand-in programs and configs with hooks; tmp_path unless root.

    As root, backup-agent runs a program named in the config (``[commands]``,
    a hook's argv[0]), and reads ``[[hooks]]`` from a config file, only if
    root owns it and only root can write it and every directory above it
    (agent.config.trust.check_trusted). pytest's tmp_path lies under /tmp, which
    anyone may write, so as root this directory is made under root's home
    (``~/.cache/backup-agent-tests/``, 0755) and removed afterwards. Not as
    root nothing is checked, and it is tmp_path.
    """
    if os.geteuid() != 0:
        yield tmp_path
        return
    base = _trusted_base()
    if base is None:
        request.applymarker(pytest.mark.may_skip)
        pytest.skip(reason="no root-owned home directory closed to others to make a trusted directory in")
    directory = tempfile.mkdtemp(prefix="test-", dir=base)
    os.chmod(directory, 0o755)
    try:
        yield Path(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@dataclasses.dataclass(frozen=True)
class ReadableCode:
    """This checkout's code where any user can read it, and a Python any user can run.

    A test that runs the CLI as another user (setpriv, su, sudo) must not
    run it from the checkout: a clone may sit in a directory only its owner
    can enter (``mktemp -d`` makes 0700 ones, and so are private homes), and
    so may the virtualenv. So the package and what it imports are copied
    into a 0755 directory, run by the base interpreter with PYTHONPATH
    pointing there.
    """

    directory: str
    python: str

    def argv(self, *arguments: str) -> list[str]:
        return [self.python, "-m", "agent.cli", *arguments]

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        return {**(os.environ if base is None else base), "PYTHONPATH": self.directory}


def _others_can_run(path: str) -> bool:
    """Every directory above ``path`` lets others in, and others may execute it."""
    real = os.path.realpath(path)
    if not os.stat(real).st_mode & stat.S_IXOTH:
        return False
    current = os.path.dirname(real)
    while True:
        if not os.stat(current).st_mode & stat.S_IXOTH:
            return False
        if current == "/":
            return True
        current = os.path.dirname(current)


@pytest.fixture(scope="session")
def readable_code() -> Generator[ReadableCode, None, None]:
    base = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    candidates = [base, "/usr/bin/python3"]
    python = None
    for candidate in candidates:
        if not os.path.exists(candidate) or not _others_can_run(candidate):
            continue
        version = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True)
        if version.stdout.strip() == str(sys.version_info[:2]):
            python = candidate
            break
    if python is None:
        pytest.skip(reason=f"no Python {sys.version_info[0]}.{sys.version_info[1]} that other users may run: tried {candidates}")
    directory = tempfile.mkdtemp(prefix="backup-agent-code-")
    try:
        os.chmod(directory, 0o755)
        ignore = shutil.ignore_patterns("__pycache__")
        shutil.copytree(REPO / "agent", os.path.join(directory, "agent"), ignore=ignore)
        for module in ("dbus_fast", "pyudev", "tomli"):
            spec = importlib.util.find_spec(module)
            if spec is not None and spec.origin is not None:
                found = os.path.dirname(spec.origin) if spec.submodule_search_locations else spec.origin
                target = os.path.join(directory, os.path.basename(found))
                if os.path.isdir(found):
                    shutil.copytree(found, target, ignore=ignore)
                else:
                    shutil.copy2(found, target)
        for root, dirs, files in os.walk(directory):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o755)
            for name in files:
                os.chmod(os.path.join(root, name), 0o644)
        yield ReadableCode(directory, python)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


requires_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, other owners); run the suite as root")


@pytest.fixture(scope="session")
def btrfs_mount(tmp_path_factory: pytest.TempPathFactory) -> Generator[Path, None, None]:
    """A real btrfs filesystem on a loop device, shared by the session's tests (each takes a directory of its own).

    mkfs.btrfs needs about 110 MiB; the image is sparse. Unmounted and its
    loop device detached (mount -o loop sets autoclear) whatever the tests did.
    """
    if os.geteuid() != 0:
        pytest.skip(reason="a btrfs filesystem on a loop device needs root")
    if shutil.which("mkfs.btrfs") is None:
        pytest.skip(reason="btrfs-progs is missing: run scripts/test, which installs it")
    base = tmp_path_factory.mktemp("btrfs")
    image, point = base / "image", base / "mnt"
    with open(image, "wb") as handle:
        handle.truncate(256 << 20)
    subprocess.run(["mkfs.btrfs", "-q", "-f", str(image)], check=True, capture_output=True)
    point.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(point)], check=True)
    try:
        yield point
    finally:
        subprocess.run(["umount", str(point)], check=False)
        image.unlink()


@pytest.fixture
def btrfs_dir(btrfs_mount: Path, request: pytest.FixtureRequest) -> Generator[Path, None, None]:
    """A fresh directory on the session's btrfs filesystem; its subvolumes are deleted afterwards."""
    path = Path(tempfile.mkdtemp(dir=btrfs_mount, prefix="t-"))
    try:
        yield path
    finally:
        subvolumes = [
            os.path.join(top, name)
            for top, dirs, _ in os.walk(path)
            for name in dirs
            if os.lstat(os.path.join(top, name)).st_ino == 256  # a subvolume's root
        ]
        for subvolume in sorted(subvolumes, key=len, reverse=True):  # the deepest first
            subprocess.run(["btrfs", "subvolume", "delete", subvolume], capture_output=True, check=False)
        shutil.rmtree(path, ignore_errors=True)
