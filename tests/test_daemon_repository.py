"""Repositories on an rsync daemon, directly and through an ssh tunnel: a real ``rsync --daemon`` and sshd on 127.0.0.1.

The server's part is the project's own completion script (rsyncd/), run by
the daemon as the module's post-xfer exec, as the README installs it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from agent.core.errors import EXIT_REFUSED, EXIT_UNREACHABLE, EXIT_USAGE, RefusedError, UsageError
from agent.engine.rsync import to_daemon
from agent.repository.daemon import Daemon, daemon_failure, parse_daemon_destination, parse_list, parse_tunnel, tunnel_argv
from tests.rsyncdaemon import RsyncDaemon, running_rsyncd
from tests.sshserver import SshServer, free_port, requires_sshd, running_sshd
from tests.test_remote import FAST, run
from tests.treeutil import describe, inodes


def test_daemon_destination_forms() -> None:
    assert parse_daemon_destination("rsync://backup@nas:8873/laptop") == Daemon(host="nas", module="laptop", user="backup", port=8873)
    assert parse_daemon_destination("nas::laptop/") == Daemon(host="nas", module="laptop")
    assert parse_daemon_destination("/local/path") is None and parse_daemon_destination("nas:/srv") is None
    with pytest.raises(UsageError, match="the module itself"):
        parse_daemon_destination("rsync://nas/laptop/sub/dir")
    with pytest.raises(UsageError):
        parse_daemon_destination("rsync://nas/")
    assert parse_tunnel("me@gate:2222").port == 2222
    with pytest.raises(UsageError):
        parse_tunnel("-oProxyCommand=x")


def test_daemon_argv_and_answers() -> None:
    daemon = Daemon(host="nas", module="laptop", user="backup", port=8873, password_file="/etc/p")
    argv = to_daemon(("rsync", "-a", "/src/", "/snapshots/N.in-progress/"), url=daemon.url("snapshots/N.in-progress") + "/",
                     options=("--password-file=/etc/p",), link_dests=("../A",))  # fmt: skip
    target = "rsync://backup@nas:8873/laptop/snapshots/N.in-progress/"
    assert argv == ("rsync", "-a", "--link-dest=../A", "--password-file=/etc/p", "/src/", target)
    forward = tunnel_argv(parse_tunnel("me@gate"), daemon, 40000, "/run/x/master")
    assert forward[-3:] == ("-L", "127.0.0.1:40000:nas:8873", "gate") and "ExitOnForwardFailure=yes" in forward
    listing = [
        "drwxr-xr-x          4,096 2026/12/05 08:42:08 .",
        "drwxr-xr-x          4,096 2026/12/05 08:42:08 2026-12-05T08-42-08+0000",
        "-rw-r--r--            172 2026/12/05 08:42:08 name with spaces",
        "lrwxrwxrwx             34 2026/12/05 08:42:08 latest -> snapshots/x",
        "-rw-r--r--              1 2026/12/05 08:42:08 bad\\#012name",
    ]
    assert parse_list(listing) == [("d", "2026-12-05T08-42-08+0000"), ("-", "name with spaces"), ("l", "latest")]
    refused = daemon_failure(daemon, ["@ERROR: auth failed on module laptop"], step="prepare", during=False)
    assert isinstance(refused, RefusedError) and "/etc/p" in refused.message


@pytest.fixture(scope="module")
def rsyncd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RsyncDaemon]:
    if os.geteuid() != 0:
        pytest.skip(reason="needs root: the daemon keeps owners as uid root")
    with running_rsyncd(tmp_path_factory.mktemp("rsyncd")) as daemon:
        yield daemon


def daemon_config(tmp_path: Path, rsyncd: RsyncDaemon, extra: str = "", **overrides: Path) -> Path:
    config = tmp_path / "config.toml"
    (tmp_path / "state").mkdir(exist_ok=True)
    config.write_text(FAST.replace('hourly = "always"', 'hourly = 1\nprefer_recent = true') + f'[system]\nstate_dir = "{tmp_path / "state"}"\n'
                      + extra + rsyncd.config(**overrides))  # fmt: skip
    return config


@pytest.mark.integration
def test_backups_to_an_rsync_daemon_are_completed_by_the_server(rsyncd: RsyncDaemon, tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    (source / "same").write_text("same")
    (source / "changes").write_text("one")
    config = daemon_config(tmp_path, rsyncd)
    url = f"rsync://backup@127.0.0.1:{rsyncd.port}/repo"
    status, events = run(config, "backup", "--no-sudo", "--json", str(source), url)
    assert status == 0, events
    repo = rsyncd.module_path
    (first,) = os.listdir(repo / "snapshots")
    assert os.readlink(repo / "latest") == f"snapshots/{first}"
    assert json.loads((repo / "metadata" / f"{first}.json").read_text())["state"] == "complete"
    (source / "changes").write_text("two, longer")
    import time

    time.sleep(1)
    status, events = run(config, "backup", "--no-sudo", "--json", "-b", "-s", str(source), url)
    assert status == 0, events
    second = max(os.listdir(repo / "snapshots"))
    one, two = inodes(repo / "snapshots" / first), inodes(repo / "snapshots" / second)
    assert {p for p in one if one[p] != two[p]} == {b"changes"}
    assert describe(repo / "snapshots" / second) == describe(source)
    # rotation (hourly = 1, the newest kept): the server moves the older one out and removes it
    status, events = run(config, "backup", "--no-sudo", "--json", "-r", "--remote", "daemon", str(source))
    assert status == 0, events
    (rotated,) = [e for e in events if e.get("step") == "rotate" and e.get("state") == "done"]
    assert rotated["delete"] == [first], rotated
    assert os.listdir(repo / "snapshots") == [second]
    assert [n for n in os.listdir(repo / "metadata") if n.startswith(".")] == []
    assert os.listdir(repo / ".trash") == []
    # list and rotate read and rotate the module too
    status, _ = run(config, "list", "--remote", "daemon")
    assert status == 0
    status, _ = run(config, "rotate", url)
    assert status == 0 and os.listdir(repo / "snapshots") == [second]


@pytest.mark.integration
def test_a_daemon_refusing_the_password_or_unreachable_is_one_line(rsyncd: RsyncDaemon, tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    wrong = tmp_path / "wrong"
    wrong.write_text("nope\n")
    wrong.chmod(0o600)
    url = f"rsync://backup@127.0.0.1:{rsyncd.port}/repo"
    status, events = run(daemon_config(tmp_path, rsyncd, password_file=wrong), "backup", "--no-sudo", "--json", str(source), url)
    assert status == EXIT_REFUSED and "refused" in str([e for e in events if e["event"] == "error"][0]["message"])
    wrong.chmod(0o644)
    status, _ = run(daemon_config(tmp_path, rsyncd, password_file=wrong), "backup", "--no-sudo", "--json", str(source), url)
    assert status == EXIT_USAGE
    closed = f"rsync://backup@127.0.0.1:{free_port()}/repo"
    status, events = run(daemon_config(tmp_path, rsyncd), "backup", "--no-sudo", "--json", str(source), closed)
    assert status == EXIT_UNREACHABLE


@pytest.mark.integration
@requires_sshd
def test_a_tunnel_reaches_the_daemon_and_is_torn_down(rsyncd: RsyncDaemon, tmp_path: Path) -> None:
    with running_sshd(tmp_path / "sshd") as sshd:
        source = tmp_path / "source"
        source.mkdir()
        (source / "f").write_text("through the tunnel")
        config = daemon_config(tmp_path, rsyncd, extra=ssh_section(sshd))
        # the daemon's address as the ssh server sees it: 127.0.0.1 there too
        url = f"rsync://backup@127.0.0.1:{rsyncd.port}/repo"
        status, events = run(config, "backup", "--no-sudo", "--json", "--tunnel", f"root@127.0.0.1:{sshd.port}", str(source), url)
        assert status == 0, events
        latest = os.readlink(rsyncd.module_path / "latest")
        assert (rsyncd.module_path / latest / "f").read_text() == "through the tunnel"
        assert not any("backup-agent-tunnel-" in line for line in processes())
        # a failure inside the tunnel tears it down too
        status, _ = run(config, "backup", "--no-sudo", "--json", "--tunnel", f"root@127.0.0.1:{sshd.port}", str(source),
                        f"rsync://backup@127.0.0.1:{rsyncd.port}/nomodule")  # fmt: skip
        assert status == EXIT_REFUSED
        assert not any("backup-agent-tunnel-" in line for line in processes())


def ssh_section(sshd: SshServer) -> str:
    return sshd.config("/unused").replace('name = "nas"', 'name = "gate"')


def processes() -> list[str]:
    return subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout.splitlines()
