"""Repositories over SSH: the argv and scripts (pure, and through a real sh), then backups into a real sshd.

The server is a real OpenSSH sshd on 127.0.0.1 (tests/sshserver.py) with its
own host key and authorized_keys; the repository lives in this test's
temporary directory on the same machine, so the test reads the server's
side directly.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from agent.cli import main
from agent.config.validate import settings_from_mapping
from agent.core.errors import (
    EXIT_BUSY,
    EXIT_CONNECTION_LOST,
    EXIT_DISK_FULL,
    EXIT_HOST_KEY,
    EXIT_NOT_AVAILABLE,
    EXIT_REFUSED,
    EXIT_REPOSITORY,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    ConfigError,
    ConnectionLostError,
    HostKeyError,
    RefusedError,
    UnreachableError,
    UsageError,
)
from agent.engine.rsync import over_ssh
from agent.system.install import sudoers_rule
from agent.repository.remote import (
    Remote,
    connection_failure,
    is_daemon_destination,
    key_problem,
    known_hosts_problem,
    parse_destination,
    parse_probe,
    remote_line,
    script_argv,
    ssh_argv,
)
from tests.sshserver import SshServer, keygen, requires_sshd, running_sshd
from tests.test_snapshot_fidelity import CHANGES, build_source
from tests.treeutil import describe, inodes

FAST = '[backup]\nionice = "none"\nnice = 0\n[rotation]\nhourly = "always"\n'
HOSTILE = ["plain", "with space", "it's", 'a "quote"', "$HOME", "`id`", "; rm -rf /", "back\\slash", "new\nline", "-n", "*", ""]


# -- pure --------------------------------------------------------------------------


def test_destination_forms() -> None:
    assert parse_destination("nas:/srv/backup") == Remote(host="nas", path="/srv/backup")
    assert parse_destination("backup@192.168.1.10:/srv/b/") == Remote(host="192.168.1.10", path="/srv/b", user="backup")
    assert parse_destination("[::1]:/srv") == Remote(host="[::1]", path="/srv")
    for local in ("/mnt/backup", "./a:b", "repo", "dir/with:colon", "/x:y"):
        assert parse_destination(local) is None, local
    for daemon in ("rsync://nas/module/path", "nas::module", "user@nas::module/x"):
        assert is_daemon_destination(daemon) and parse_destination(daemon) is None
    with pytest.raises(UsageError, match="absolute path"):
        parse_destination("nas:relative/path")
    with pytest.raises(UsageError, match="neither"):
        parse_destination("-oProxyCommand=x:/y")


def test_remote_line_arrives_as_argv_through_a_real_shell() -> None:
    """What ssh hands the server's shell is parsed back into exactly these words (here by a real sh)."""
    words = ["printf", "%s\\0", *HOSTILE]
    out = subprocess.run(["/bin/sh", "-c", remote_line(words)], capture_output=True, check=True).stdout
    assert out.split(b"\0")[:-1] == [w.encode() for w in HOSTILE]
    argv = script_argv(Remote("nas", "/r"), 'printf "%s\\0" "$@"', *HOSTILE)
    assert argv[-2] == "nas"
    out = subprocess.run(["/bin/sh", "-c", argv[-1]], capture_output=True, check=True).stdout
    assert out.split(b"\0")[:-1] == [w.encode() for w in HOSTILE]


def test_ssh_never_prompts_and_checks_host_keys_strictly() -> None:
    argv = ssh_argv(Remote("nas", "/r", user="backup", port=2222, identity_file="/etc/k", known_hosts="/etc/kh", connect_timeout=7))
    text = " ".join(argv)
    for option in ("-F none", "BatchMode=yes", "StrictHostKeyChecking=yes", "ConnectTimeout=7", "UserKnownHostsFile=/etc/kh",
                   "GlobalKnownHostsFile=/dev/null", "IdentitiesOnly=yes", "-i /etc/k", "-p 2222", "-l backup"):  # fmt: skip
        assert option in text, option
    assert "ControlMaster" not in text


def test_rsync_over_ssh_links_relative_to_the_target() -> None:
    local = ("rsync", "-a", "/src/", "/srv/r/snapshots/N.in-progress/")
    argv = over_ssh(local, shell="ssh -p 2", host="nas", link_dests=("../A", "../B.in-progress"))
    assert argv == (
        "rsync", "-a", "-e", "ssh -p 2", "--link-dest=../A", "--link-dest=../B.in-progress",
        "/src/", "nas:/srv/r/snapshots/N.in-progress/",
    )  # fmt: skip
    for bad in ("/srv/r/snapshots/A", "../a/b", "..", "../.."):
        with pytest.raises(ValueError):
            over_ssh(local, shell="ssh", host="nas", link_dests=(bad,))


def test_probe_answer_is_read_strictly() -> None:
    probe = parse_probe([
        "state repository", "marker version = 1", "has snapshots", "dir 2026-01-01T00-00-00+0000",
        "dir 2026-01-02T00-00-00+0000.in-progress", "dir junk", "other 2026-01-03T00-00-00+0000", "unnamed",
        "latest snapshots/2026-01-03T00-00-00+0000", "trash", "trash",
    ])  # fmt: skip
    assert probe.snapshot_names == ["2026-01-01T00-00-00+0000"]
    assert probe.in_progress_names == ["2026-01-02T00-00-00+0000"]
    assert probe.foreign_names == ["2026-01-03T00-00-00+0000", "junk"]
    # latest names something that is not a listed snapshot (a link): the newest listed one is used instead.
    assert probe.latest_name() == "2026-01-01T00-00-00+0000"
    assert probe.trash == 2 and probe.unnamed == 1


def test_connection_failures_each_have_their_error() -> None:
    remote = Remote("nas", "/r", known_hosts="/etc/kh")
    cases = {
        "@@@@ WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! @@@@": (HostKeyError, "CHANGED"),
        "No ED25519 host key is known for [127.0.0.1]:2222 and you have requested strict checking.": (HostKeyError, "not in known_hosts"),
        "root@127.0.0.1: Permission denied (publickey).": (RefusedError, "refused the key"),
        "ssh: connect to host 127.0.0.1 port 1: Connection refused": (UnreachableError, "cannot be reached"),
        "Connection closed by 127.0.0.1 port 22": (ConnectionLostError, "broke off"),
    }
    for line, (kind, words) in cases.items():
        failure = connection_failure(remote, ["x", line], step="prepare", during=False)
        assert isinstance(failure, kind) and words in failure.message, line
    during = connection_failure(remote, ["rsync: connection unexpectedly closed (5 bytes received so far) [sender]"], step="transfer", during=True)
    assert isinstance(during, ConnectionLostError) and "resumes" in during.message
    assert connection_failure(remote, ["rsync: some other trouble"], step="transfer", during=True) is None


def test_identity_file_must_be_private() -> None:
    def info(mode: int, uid: int) -> os.stat_result:
        return os.stat_result((0o100000 | mode, 0, 0, 1, uid, 0, 0, 0, 0, 0))

    assert key_problem("/k", info(0o600, 0), as_root=True) is None
    assert "chmod 600" in (key_problem("/k", info(0o640, 0), as_root=True) or "")
    assert "not root" in (key_problem("/k", info(0o600, 1000), as_root=True) or "")
    assert key_problem("/k", info(0o600, 1000), as_root=False) is None
    assert known_hosts_problem("/kh", info(0o644, 0), as_root=True) is None
    assert "chmod go-w" in (known_hosts_problem("/kh", info(0o666, 0), as_root=True) or "")
    assert "not root" in (known_hosts_problem("/kh", info(0o644, 1000), as_root=True) or "")


def test_the_sudo_rule_has_one_backup_form_per_remote() -> None:
    rule = sudoers_rule("alice", "/usr/local/bin/backup-agent", ["usb1"], ["nas", "nas", "attic"])
    assert "/usr/local/bin/backup-agent backup --json --remote nas, \\" in rule
    assert rule.count("--remote nas") == 1 and "--remote attic" in rule
    assert "eject --json --remote" not in rule and "open --json --remote" not in rule
    with pytest.raises(UsageError, match="remote name"):
        sudoers_rule("alice", "/usr/local/bin/backup-agent", [], ["ALL, /bin/sh"])


def test_remote_section_is_validated() -> None:
    section = {"name": "nas", "host": "nas.home.arpa", "path": "/srv/b/", "port": 2222, "user": "backup", "identity_file": "/etc/k"}
    data = {"remote": [section]}
    (remote,) = settings_from_mapping(data, "c.toml").remotes
    assert (remote.host, remote.path, remote.port, remote.user) == ("nas.home.arpa", "/srv/b", 2222, "backup")
    for bad, key in (({"host": "-oProxyCommand=x"}, "host"), ({"path": "srv"}, "path"), ({"port": 0}, "port"), ({"colour": 1}, "colour")):
        broken = {"remote": [{**data["remote"][0], **bad}]}
        with pytest.raises(ConfigError, match=rf"remote\[0\]\.{key}"):
            settings_from_mapping(broken, "c.toml")


# -- against a real sshd ------------------------------------------------------------


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    with running_sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


@pytest.fixture
def server_root(tmp_path: Path) -> Path:
    """The repository's parent on the server, its name as hostile as a path may be."""
    root = tmp_path / "server side 'x' $y"
    root.mkdir()
    return root


def write_config(tmp_path: Path, sshd: SshServer, repo: Path, extra: str = "", **overrides: Path) -> Path:
    config = tmp_path / "config.toml"
    (tmp_path / "state").mkdir(exist_ok=True)
    config.write_text(FAST + f'[system]\nstate_dir = "{tmp_path / "state"}"\n' + extra + sshd.config(str(repo), **overrides))
    return config


def run(config: Path, *argv: str) -> tuple[int, list[dict[str, object]]]:
    """The CLI with --json; its status and its events."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main([argv[0], "--config", str(config), *argv[1:]])
    events = [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]
    return status, events


def backup(config: Path, source: Path, destination: str, *more: str) -> tuple[int, list[dict[str, object]]]:
    return run(config, "backup", "--no-sudo", "--json", *more, str(source), destination)


def the_error(events: list[dict[str, object]]) -> dict[str, object]:
    (failure,) = [e for e in events if e["event"] == "error"]
    return failure




@pytest.mark.integration
@requires_sshd
def test_backups_over_ssh_link_unchanged_files_and_complete(sshd: SshServer, server_root: Path, tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    for name in ("same", "changes", *[w for w in HOSTILE if w and "/" not in w]):
        (source / ("f-" + name)).write_text(name)
    repo = server_root / "repo"
    config = write_config(tmp_path, sshd, repo)
    status, events = backup(config, source, f"127.0.0.1:{repo}")
    assert status == 0, events
    (source / "f-changes").write_text("changed, and longer")
    status, events = run(config, "backup", "--no-sudo", "--json", "--remote", "nas", str(source))
    assert status == 0, events
    first, second = sorted(os.listdir(repo / "snapshots"))
    assert os.readlink(repo / "latest") == f"snapshots/{second}"
    one, two = inodes(repo / "snapshots" / first), inodes(repo / "snapshots" / second)
    assert {p for p in one if one[p] != two[p]} == {b"f-changes"}
    assert describe(repo / "snapshots" / second) == describe(source)
    metadata = json.loads((repo / "metadata" / f"{second}.json").read_text())
    assert (metadata["state"], metadata["link_dest"], metadata["previous"]) == ("complete", first, first)
    assert not (repo / ".remote-lock").exists()
    complete = [e for e in events if e["event"] == "complete"][0]
    assert complete["snapshot"] == second
    status, _ = run(config, "list", "--remote", "nas")
    assert status == 0
    # rotate on the server: one hourly kept, the older one out of the listing and removed
    status, _ = run(config, "rotate", "--hourly", "1", "--prefer-recent", "--remote", "nas")
    assert status == 0
    assert sorted(os.listdir(repo / "snapshots")) == [second]
    assert not (repo / "metadata" / f"{first}.json").exists()
    assert os.listdir(repo / ".trash") == []
    # restore from the server: the chosen snapshot's files, every attribute kept, into a new directory
    (source / "f-changes").write_text("lost")
    os.unlink(source / "f-it's")
    where = tmp_path / "restored"
    where.mkdir()
    status, _ = run(config, "restore", "--repository", f"127.0.0.1:{repo}", "--to", str(where), str(source / "f-changes"), str(source / "f-it's"))
    assert status == 0
    back = where
    assert (back / "f-changes").read_text() == "changed, and longer"
    assert (back / "f-it's").read_text() == "it's"
    assert describe(back / "f-changes") == describe(repo / "snapshots" / second / "f-changes")


@pytest.mark.integration
@requires_sshd
def test_history_fidelity_over_ssh(sshd: SshServer, server_root: Path, tmp_path: Path) -> None:
    """A snapshot over ssh equals its source, and no change in the source reaches the older snapshot."""
    if shutil.which("setfacl") is None:
        pytest.skip(reason="setfacl is missing: run scripts/test, which installs the acl package")
    source = tmp_path / "source"
    build_source(source)
    repo = server_root / "repo"
    config = write_config(tmp_path, sshd, repo)
    assert backup(config, source, f"127.0.0.1:{repo}")[0] == 0
    (first,) = os.listdir(repo / "snapshots")
    assert describe(repo / "snapshots" / first) == describe(source)
    before = describe(repo / "snapshots" / first)
    for change in sorted(CHANGES):
        if change not in ("delete", "hard-link broken"):
            CHANGES[change](source)
    time.sleep(1)  # the next snapshot's name is a second later
    assert backup(config, source, f"127.0.0.1:{repo}")[0] == 0
    second = max(os.listdir(repo / "snapshots"))
    assert describe(repo / "snapshots" / second) == describe(source)
    assert describe(repo / "snapshots" / first) == before


@pytest.mark.integration
@requires_sshd
def test_a_repository_that_is_not_ours_is_refused(sshd: SshServer, server_root: Path, tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    (source / "f").write_text("x")
    foreign = server_root / "data"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("mine")
    config = write_config(tmp_path, sshd, foreign)
    status, events = backup(config, source, f"127.0.0.1:{foreign}")
    assert status == EXIT_REPOSITORY and "not ours" in str(the_error(events)["message"])
    assert os.listdir(foreign) == ["thesis.tex"]
    other = server_root / "other"
    other.mkdir()
    (other / ".backup-agent.toml").write_text('version = 1\nid = "0123"\nhost = "another-laptop"\ncreated = "2026"\n')
    config = write_config(tmp_path, sshd, other)
    status, events = backup(config, source, f"127.0.0.1:{other}")
    assert status == EXIT_REPOSITORY and "another-laptop" in str(the_error(events)["message"])
    assert sorted(os.listdir(other)) == [".backup-agent.toml"]


@pytest.mark.integration
@requires_sshd
def test_host_keys_unknown_or_changed_are_refused(sshd: SshServer, server_root: Path, tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    repo = server_root / "repo"
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    status, events = backup(write_config(tmp_path, sshd, repo, known_hosts=empty), source, f"127.0.0.1:{repo}")
    assert status == EXIT_HOST_KEY and "not in known_hosts" in str(the_error(events)["message"])
    changed = tmp_path / "changed_known_hosts"
    other_key = keygen(tmp_path / "other_host_key").split()[:2]
    changed.write_text(f"[127.0.0.1]:{sshd.port} {' '.join(other_key)}\n")
    status, events = backup(write_config(tmp_path, sshd, repo, known_hosts=changed), source, f"127.0.0.1:{repo}")
    assert status == EXIT_HOST_KEY and "CHANGED" in str(the_error(events)["message"])
    assert not repo.exists()
    assert changed.read_text().count("\n") == 1  # never accepted into known_hosts


@pytest.mark.integration
@requires_sshd
def test_refused_key_and_unreachable_host_fail_fast(sshd: SshServer, server_root: Path, tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    repo = server_root / "repo"
    stranger = tmp_path / "stranger_key"
    keygen(stranger)
    status, events = backup(write_config(tmp_path, sshd, repo, identity=stranger), source, f"127.0.0.1:{repo}")
    assert status == EXIT_REFUSED and "refused the key" in str(the_error(events)["message"])
    stranger.chmod(0o644)
    status, _ = backup(write_config(tmp_path, sshd, repo, identity=stranger), source, f"127.0.0.1:{repo}")
    assert status == EXIT_USAGE  # refused before ssh runs: others could read it
    writable = tmp_path / "writable_known_hosts"
    writable.write_text(sshd.known_hosts.read_text())
    writable.chmod(0o666)
    status, events = backup(write_config(tmp_path, sshd, repo, known_hosts=writable), source, f"127.0.0.1:{repo}")
    assert status == EXIT_USAGE and "chmod go-w" in str(the_error(events)["message"])
    config = tmp_path / "closed.toml"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    config.write_text(FAST + sshd.config(str(repo)).replace(f"port = {sshd.port}", f"port = {closed_port}"))
    started = time.monotonic()
    status, events = backup(config, source, f"127.0.0.1:{repo}")
    assert status == EXIT_UNREACHABLE and "cannot be reached" in str(the_error(events)["message"])
    assert time.monotonic() - started < 10
    assert not repo.exists()


@pytest.mark.integration
@requires_sshd
def test_a_dropped_connection_keeps_the_transfer_and_the_next_run_resumes(sshd: SshServer, server_root: Path, tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    (source / "a-first").write_text("small")
    repo = server_root / "repo"
    config = write_config(tmp_path, sshd, repo)
    assert backup(config, source, f"127.0.0.1:{repo}")[0] == 0
    (earlier,) = os.listdir(repo / "snapshots")
    before = describe(repo / "snapshots" / earlier)
    (source / "a-first").write_text("changed, so it is sent first")
    with open(source / "z-big", "wb") as big:
        for _ in range(48):
            big.write(os.urandom(1 << 20))
    sshd.rsync_pidfile.unlink(missing_ok=True)
    killed: list[int] = []

    def cut() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            partial = list((repo / "snapshots").glob("*.in-progress/a-first"))
            if partial and sshd.rsync_pidfile.exists():
                pid = int(sshd.rsync_pidfile.read_text())
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.005)

    cutter = threading.Thread(target=cut)
    cutter.start()
    status, events = backup(config, source, f"127.0.0.1:{repo}")
    cutter.join()
    assert killed, "the transfer ended before the server's rsync could be killed"
    assert status == EXIT_CONNECTION_LOST, events
    failure = the_error(events)
    assert failure["step"] == "transfer" and "resumes" in str(failure["message"]) and failure["snapshots_untouched"] is True
    (left,) = [n for n in os.listdir(repo / "snapshots") if n.endswith(".in-progress")]
    assert describe(repo / "snapshots" / earlier) == before
    assert not (repo / ".remote-lock").exists()
    status, events = backup(config, source, f"127.0.0.1:{repo}")
    assert status == 0, events
    latest = os.readlink(repo / "latest").split("/")[-1]
    metadata = json.loads((repo / "metadata" / f"{latest}.json").read_text())
    assert metadata["resumed_from"] == [left.removesuffix(".in-progress")]
    assert not [n for n in os.listdir(repo / "snapshots") if n.endswith(".in-progress")]
    assert describe(repo / "snapshots" / latest) == describe(source)


@pytest.mark.integration
@requires_sshd
def test_a_full_remote_disk_is_one_line_and_loses_nothing(sshd: SshServer, server_root: Path, tmp_path: Path) -> None:
    if shutil.which("mkfs.ext4") is None or shutil.which("losetup") is None:
        pytest.skip(reason="mkfs.ext4 and losetup are missing: run scripts/test")
    image = tmp_path / "small.img"
    with open(image, "wb") as handle:
        handle.truncate(8 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    mount_point = server_root / "small"
    mount_point.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mount_point)], check=True)
    try:
        source = tmp_path / "source"
        source.mkdir()
        (source / "small").write_text("fits")
        repo = mount_point / "repo"
        config = write_config(tmp_path, sshd, repo)
        assert backup(config, source, f"127.0.0.1:{repo}")[0] == 0
        (earlier,) = os.listdir(repo / "snapshots")
        before = describe(repo / "snapshots" / earlier)
        with open(source / "big", "wb") as big:
            big.write(os.urandom(12 << 20))
        status, events = backup(config, source, f"127.0.0.1:{repo}")
        assert status == EXIT_DISK_FULL, events
        assert "full" in str(the_error(events)["message"])
        assert describe(repo / "snapshots" / earlier) == before
        assert os.readlink(repo / "latest") == f"snapshots/{earlier}"
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


@pytest.mark.integration
@requires_sshd
def test_a_replaced_repository_and_a_lock_of_another_host_are_refused(sshd: SshServer, server_root: Path, tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    (source / "f").write_text("x")
    repo = server_root / "repo"
    config = write_config(tmp_path, sshd, repo)
    assert run(config, "backup", "--no-sudo", "--json", "--remote", "nas", str(source))[0] == 0
    recorded = (tmp_path / "state" / "remote-nas.id").read_text().strip()
    marker = repo / ".backup-agent.toml"
    original = marker.read_text()
    assert f'id = "{recorded}"' in original
    marker.write_text(original.replace(recorded, "f" * 32))
    status, events = run(config, "backup", "--no-sudo", "--json", "--remote", "nas", str(source))
    assert status == EXIT_REPOSITORY and "recorded" in str(the_error(events)["message"])
    assert not (repo / ".remote-lock").exists() and len(os.listdir(repo / "snapshots")) == 1
    marker.write_text(original)
    (repo / ".remote-lock").mkdir()
    holder = '{"host": "desktop-in-the-attic", "pid": 4242, "started": "2026-12-01T10:00:00+01:00"}'
    (repo / ".remote-lock" / "holder").write_text(holder + "\n")
    status, events = run(config, "backup", "--no-sudo", "--json", "--remote", "nas", str(source))
    assert status == EXIT_BUSY and "desktop-in-the-attic" in str(the_error(events)["message"])
    assert (repo / ".remote-lock" / "holder").read_text() == holder + "\n"
    assert len(os.listdir(repo / "snapshots")) == 1


@pytest.mark.integration
@requires_sshd
def test_a_dry_run_writes_nothing_on_the_server(sshd: SshServer, server_root: Path, tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    (source / "f").write_text("x")
    repo = server_root / "repo"
    config = write_config(tmp_path, sshd, repo)
    status, events = backup(config, source, f"127.0.0.1:{repo}", "--dry-run")
    assert status == 0, events
    assert not repo.exists() and os.listdir(tmp_path / "state") == []


@pytest.mark.integration
@requires_sshd
def test_a_lock_this_machine_left_is_taken_over_and_odd_entries_are_left_alone(sshd: SshServer, server_root: Path, tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    (source / "f").write_text("x")
    repo = server_root / "repo"
    config = write_config(tmp_path, sshd, repo)
    assert backup(config, source, f"127.0.0.1:{repo}")[0] == 0
    (first,) = os.listdir(repo / "snapshots")
    # a run of this machine killed while it held the lock, and entries nobody should use
    (repo / ".remote-lock").mkdir()
    (repo / ".remote-lock" / "holder").write_text(json.dumps({"host": socket.gethostname(), "pid": 999999}) + "\n")
    forged = repo / "snapshots" / "2026-01-01T00-00-00+0000\n2026-01-02T00-00-00+0000"
    forged.mkdir()
    os.symlink("/etc", repo / "snapshots" / "2026-01-03T00-00-00+0000")
    (repo / "snapshots" / "2026-01-04T00-00-00+0000.in-progress").mkdir()
    status, events = backup(config, source, f"127.0.0.1:{repo}", "-b")
    assert status == 0, events
    assert not (repo / ".remote-lock").exists()
    status, _ = run(config, "rotate", "--hourly", "1", "--prefer-recent", "--discard-unfinished", "--remote", "nas")
    assert status == 0
    left = sorted(os.listdir(repo / "snapshots"))
    assert forged.name in left and "2026-01-03T00-00-00+0000" in left  # never used, never deleted
    assert "2026-01-04T00-00-00+0000.in-progress" not in left and first in left
    assert os.path.islink(repo / "snapshots" / "2026-01-03T00-00-00+0000") and os.path.isdir("/etc")


@pytest.mark.parametrize("command", [["versions", "/etc/hosts"], ["diff"], ["verify"], ["packages"]])
def test_reading_commands_refuse_a_server_they_cannot_read_by_name(command: list[str], tmp_path: Path) -> None:
    """An rsync daemon runs no command for versions, diff and verify, and packages reads local trees only:
    exit 8 and what to do, before any connection (over ssh the first three work: tests/test_remote_read.py)."""
    config = tmp_path / "config.toml"
    config.write_text(FAST)
    servers = ("nas.invalid:/srv/backup", "rsync://nas.invalid/laptop") if command[0] == "packages" else ("rsync://nas.invalid/laptop",)
    for where in servers:
        status, _ = run(config, command[0], "--repository", where, *command[1:])
        assert status == EXIT_NOT_AVAILABLE


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (sshd's children put themselves in sessions of their own)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    parents[int(entry)] = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        children = [child for child, parent in parents.items() if parent == current]
        found += children
        frontier += children
    return found


@pytest.mark.integration
@requires_sshd
def test_a_server_gone_mid_transfer_is_reported_as_such_and_not_as_the_unlock_after(server_root: Path, tmp_path: Path) -> None:
    """The whole sshd dies during the transfer: the error is the lost connection (18), not the unlock that cannot be sent."""
    with running_sshd(tmp_path / "own-sshd") as own:
        source = tmp_path / "source"
        source.mkdir()
        (source / "a-first").write_text("small")
        with open(source / "z-big", "wb") as big:
            for _ in range(48):
                big.write(os.urandom(1 << 20))
        repo = server_root / "repo"
        config = write_config(tmp_path, own, repo)
        killed: list[int] = []

        def cut() -> None:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if list((repo / "snapshots").glob("*.in-progress/a-first")) and own.rsync_pidfile.exists():
                    for pid in [own.process.pid, *descendants(own.process.pid)]:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                            killed.append(pid)
                    return
                time.sleep(0.005)

        cutter = threading.Thread(target=cut)
        cutter.start()
        status, events = backup(config, source, f"127.0.0.1:{repo}")
        cutter.join()
        assert killed, "the transfer ended before the server could be killed"
        assert status == EXIT_CONNECTION_LOST, events
        assert the_error(events)["step"] == "transfer"
        assert (repo / ".remote-lock").is_dir()  # left for this machine's next run to take over
