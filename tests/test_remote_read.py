"""Reading a remote repository: manifests hashed on the server, verify, versions, diff over ssh, restore from an rsync daemon.

The server scripts run through a real ``sh`` here (the pure part), then
against the real sshd and ``rsync --daemon`` of tests/sshserver.py and
tests/rsyncdaemon.py on 127.0.0.1; the repository is in this test's
temporary directory, so the test changes the server's side directly (a
tampered file).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import time
from contextlib import redirect_stdout
from pathlib import Path
from typing import Iterator

import pytest

from agent.cli import main
from agent.core.errors import EXIT_DAMAGED, EXIT_NOT_AVAILABLE, EXIT_UNVERIFIED, EXIT_USAGE
from agent.engine.remote_read import finish_diff, manifest_lines, plan_diff, render_format1, unchanged_manifest
from agent.repository import manifest as manifests
from agent.repository.remote_read import (
    BATCH,
    COMPARE,
    COPY_MANIFEST,
    HASH,
    HASH_ALONE,
    HASHED_ALONE_BATCH,
    HASHED_BATCH,
    HASHED_TREE,
    SAME,
    TREE,
    VERSIONS,
    Stat,
    escaped_by_sha256sum,
    parse_hashed_listing,
    parse_listing,
    parse_versions,
    parse_sums,
    pieces,
    relative,
)
from tests.rsyncdaemon import RsyncDaemon, running_rsyncd
from tests.sshserver import SshServer, requires_sshd, running_sshd
from tests.test_remote import HOSTILE, backup, write_config
from tests.treeutil import describe

NAMES = [w for w in HOSTILE if w and "/" not in w]


def text_of(config: Path, *argv: str) -> tuple[int, str]:
    """The CLI's status and what it printed."""
    out = io.StringIO()
    with redirect_stdout(out):
        status = main([argv[0], "--config", str(config), *argv[1:]])
    return status, out.getvalue()


# -- pure, and the scripts through a real sh ------------------------------------------


def test_listing_and_checksums_survive_any_name_through_a_real_sh(tmp_path: Path) -> None:
    tree = tmp_path / "snap"
    tree.mkdir()
    for index, name in enumerate(NAMES):
        (tree / name).write_bytes(b"x" * index)
    (tree / "sub").mkdir()
    (tree / "sub" / "deep").write_text("deep")
    os.link(tree / "plain", tree / "sub" / "hard link")
    os.symlink("plain", tree / "link")
    listed = subprocess.run(["sh", "-c", TREE, "sh", str(tree), "f", BATCH], capture_output=True, check=True).stdout
    files = {relative(name): info for name, info in parse_listing(listed)}
    expected = {os.fsencode(n) for n in NAMES} | {b"sub/deep", b"sub/hard link"}
    assert set(files) == expected
    assert files[b"sub/hard link"].inode == files[b"plain"].inode == os.lstat(tree / "plain").st_ino
    assert all(files[os.fsencode(n)].size == i for i, n in enumerate(NAMES))
    digests: dict[bytes, str] = {}
    for how in ("", "alone"):
        chosen = [rel for rel in sorted(files) if escaped_by_sha256sum(rel) == (how == "alone")]
        stdin = b"".join(b"./" + rel + b"\0" for rel in chosen)
        hashed = subprocess.run(["sh", "-c", HASH, "sh", str(tree), how, HASH_ALONE], input=stdin, capture_output=True, check=True).stdout
        digests.update((relative(name), digest) for name, digest in parse_sums(hashed).items())
    assert digests == {rel: manifests.hash_file(os.fsencode(tree) + b"/" + rel)[0] for rel in files}
    # listed and hashed in one call: alone where a path would be escaped (find sorts them), the others in bulk
    argv = ["sh", "-c", HASHED_TREE, "sh", str(tree), HASHED_BATCH, HASHED_ALONE_BATCH]
    both = parse_hashed_listing(subprocess.run(argv, capture_output=True, check=True).stdout)
    assert {relative(n): d for n, _, d in both} == digests
    assert {relative(n): i.inode for n, i, _ in both} == {rel: info.inode for rel, info in files.items()}
    everything = subprocess.run(["sh", "-c", TREE, "sh", str(tree), "", BATCH], capture_output=True, check=True).stdout
    kinds = {relative(name): info for name, info in parse_listing(everything)}
    assert kinds[b"link"].is_link and kinds[b"sub"].is_dir and b"" in kinds
    assert list(pieces([b"a" * 5, b"b" * 5, b"c"], limit=12)) == [b"aaaaa\0bbbbb\0", b"c\0"]


BUSYBOX_TOOLS = ("sh", "find", "stat", "sha256sum", "xargs", "cmp", "readlink", "cp", "mv", "printf", "cat")


def test_the_server_scripts_run_on_busybox_alone(tmp_path: Path) -> None:
    """A NAS often has busybox only: every script through busybox's sh, with busybox's tools alone on PATH."""
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip(reason="busybox is missing: run scripts/test, which installs it")
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in BUSYBOX_TOOLS:
        os.symlink(busybox, tools / tool)
    env = {"PATH": str(tools)}
    snap = tmp_path / "snapshots" / "A"
    snap.mkdir(parents=True)
    for index, name in enumerate(NAMES):
        (snap / name).write_bytes(b"y" * (index + 1))
    os.symlink("plain", snap / "link")

    def sh(script: str, *args: str, stdin: bytes = b"") -> bytes:
        done = subprocess.run([str(tools / "sh"), "-c", script, "sh", *args], input=stdin, capture_output=True, env=env)
        assert done.returncode == 0, done.stderr
        return done.stdout

    files = {relative(n): i for n, i in parse_listing(sh(TREE, str(snap), "f", BATCH))}
    assert set(files) == {os.fsencode(n) for n in NAMES} and files[b"plain"].inode == os.lstat(snap / "plain").st_ino
    digests: dict[bytes, str] = {}
    for how in ("", "alone"):
        chosen = b"".join(b"./" + rel + b"\0" for rel in files if escaped_by_sha256sum(rel) == (how == "alone"))
        digests.update((relative(n), d) for n, d in parse_sums(sh(HASH, str(snap), how, HASH_ALONE, stdin=chosen)).items())
    assert digests == {rel: manifests.hash_file(os.fsencode(snap) + b"/" + rel)[0] for rel in files}
    both = parse_hashed_listing(sh(HASHED_TREE, str(snap), HASHED_BATCH, HASHED_ALONE_BATCH))
    assert {relative(n): d for n, _, d in both} == digests
    (held,) = parse_versions(sh(VERSIONS, str(tmp_path), "link", BATCH, "A"))
    assert held.target == b"plain" and held.stat.is_link
    assert sh(COMPARE, str(snap), str(snap), SAME, stdin=b"plain\0link\0") == b"ss"
    (tmp_path / "metadata").mkdir()
    (tmp_path / "metadata" / "A.manifest").write_text("m")
    assert sh(COPY_MANIFEST, str(tmp_path), "A", "B").strip() == b"copied"
    assert (tmp_path / "metadata" / "B.manifest").read_text() == "m"


def _stat(inode: int, size: int, mode: int = 0o100644, mtime: int = 1) -> Stat:
    return Stat(1, inode, mode, 0, 0, size, mtime, mtime)


def test_a_manifest_reuses_the_lines_of_shared_inodes_and_hashes_the_rest_once() -> None:
    digest = "a" * 64
    previous, _ = render_format1([manifests.line(digest, 3, 7, b"same"), manifests.line("b" * 64, 4, 8, b"gone")])
    known = manifests.Known(previous, {7: previous.index(b"a" * 64) << 1})
    files = {b"same": _stat(7, 3), b"new": _stat(9, 5), b"new link": _stat(9, 5)}
    lines, to_hash, reused = manifest_lines(files, known, {})
    assert (to_hash, reused) == ([b"new"], 1)
    lines, to_hash, reused = manifest_lines(files, known, {b"new": "c" * 64})
    assert to_hash == [] and sorted(lines) == sorted(
        [manifests.line(digest, 3, 7, b"same"), manifests.line("c" * 64, 5, 9, b"new"), manifests.line("c" * 64, 5, 9, b"new link")]
    )
    data, own = render_format1(lines)
    parsed = manifests.parse(data, "test")
    assert parsed.digest == own and {e.path for e in parsed.entries} == set(files)


def test_a_manifest_is_copied_only_when_rsync_wrote_nothing_and_no_file_is_gone() -> None:
    recorded = {"digest": "sha256:x", "format": 1, "entries": 3, "algorithm": "sha256"}
    ok = {"statistics": {"transferred_files": 0, "created_files": 0, "regular_files": 3}, "partial": False, "resumed_from": []}
    copied = unchanged_manifest("A", ("A", frozenset()), ok, {"manifest": recorded}, [])
    assert copied is not None and (copied["digest"], copied["reused_files"], copied["hashed_files"]) == ("sha256:x", 3, 0)
    one_gone = {**ok, "statistics": {**ok["statistics"], "regular_files": 2}}
    a_mode_changed = ("A", frozenset({b"f"}))  # rsync's "cf": a new inode with the old contents
    for args in (
        ("A", None, ok, {"manifest": recorded}, []),  # nothing itemized was gathered
        ("A", a_mode_changed, ok, {"manifest": recorded}, []),
        ("A", ("B", frozenset()), ok, {"manifest": recorded}, []),  # linked against another snapshot
        ("A", ("A", frozenset()), one_gone, {"manifest": recorded}, []),
        ("A", ("A", frozenset()), {**ok, "vanished": 1}, {"manifest": recorded}, []),
        ("A", ("A", frozenset()), {**ok, "partial": True}, {"manifest": recorded}, []),
        ("A", ("A", frozenset()), ok, {"manifest": {"error": "not recorded: the repository is remote"}}, []),
        ("A", ("A", frozenset()), ok, {"manifest": recorded}, ["rsync: some files vanished before they could be transferred"]),
    ):
        assert unchanged_manifest(*args) is None, args


def test_diff_plan_from_two_listings() -> None:
    a = {b"d": _stat(1, 0, 0o40755), b"same": _stat(2, 1), b"gone": _stat(3, 1), b"grew": _stat(4, 1), b"touched": _stat(5, 2)}
    b = {b"d": _stat(11, 0, 0o40700), b"same": _stat(2, 1), b"grew": _stat(14, 9), b"touched": _stat(15, 2, mtime=5), b"new": _stat(16, 3)}
    found, to_compare = plan_diff(a, b)
    assert to_compare == [b"touched"]
    changes = {(c.path, c.change, c.what) for c in finish_diff(a, b, found, {b"touched": True})}
    assert changes == {
        ("d", "changed", "metadata"), ("gone", "removed", None), ("grew", "changed", "content"),
        ("touched", "changed", "metadata"), ("new", "added", None),
    }  # fmt: skip
    assert ("touched", "changed", "content") in {(c.path, c.change, c.what) for c in finish_diff(a, b, found, {b"touched": False})}


# -- over ssh ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    with running_sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


def two_snapshots(sshd: SshServer, tmp_path: Path) -> tuple[Path, Path, Path, str, str]:
    """A source with hostile names backed up twice to the server, one file changed between: config, source, repo, names."""
    source = tmp_path / "source"
    source.mkdir()
    for name in NAMES:
        (source / ("f-" + name)).write_text(name)
    (source / "dir").mkdir()
    (source / "dir" / "changes").write_text("one")
    repo = tmp_path / "server side 'x' $y" / "repo"
    repo.parent.mkdir()
    config = write_config(tmp_path, sshd, repo)
    assert backup(config, source, f"127.0.0.1:{repo}")[0] == 0
    (source / "dir" / "changes").write_text("two, longer")
    (source / "f-plain").unlink()
    (source / "added").write_text("new")
    time.sleep(1)  # the next snapshot's name is a second later
    assert backup(config, source, f"127.0.0.1:{repo}")[0] == 0
    first, second = sorted(os.listdir(repo / "snapshots"))
    return config, source, repo, first, second


@pytest.mark.integration
@requires_sshd
def test_remote_snapshots_get_a_manifest_that_verify_checks_on_the_server(sshd: SshServer, tmp_path: Path) -> None:
    config, source, repo, first, second = two_snapshots(sshd, tmp_path)
    metadata = json.loads((repo / "metadata" / f"{second}.json").read_text())["manifest"]
    # the second reuses every unchanged file's line and hashes (on the server) only the two it wrote
    assert (metadata["hashed_files"], metadata["reused_files"], metadata["hashed_on"]) == (2, len(NAMES) - 1, "server")
    parsed = manifests.load(str(repo / "metadata" / f"{second}.manifest"))
    assert parsed.digest == metadata["digest"]
    assert {e.path: e.digest for e in parsed.entries} == {
        rel: manifests.hash_file(os.fsencode(repo / "snapshots" / second) + b"/" + rel)[0]
        for rel in (os.fsencode(p.relative_to(source)) for p in source.rglob("*") if p.is_file())
    }
    # nothing changed: the manifest is the previous one, copied on the server, and checks out
    time.sleep(1)
    assert backup(config, source, f"127.0.0.1:{repo}", "-b", "-s")[0] == 0  # no rotation: one hourly would be kept
    third = max(os.listdir(repo / "snapshots"))
    again = json.loads((repo / "metadata" / f"{third}.json").read_text())["manifest"]
    assert again["copied"] and again["digest"] == metadata["digest"]
    assert (repo / "metadata" / f"{third}.manifest").read_bytes() == (repo / "metadata" / f"{second}.manifest").read_bytes()
    status, out = text_of(config, "verify", "--remote", "nas", "--all")
    assert status == 0 and out.startswith("intact: 3 snapshots"), out
    # a file changed on the server, in the newest snapshot only: damaged, named, and the exit status says so
    tampered = repo / "snapshots" / third / "added"
    tampered.write_text("NEW")  # one inode: the second and third snapshot hold it
    status, out = text_of(config, "verify", "--repository", f"127.0.0.1:{repo}", "--all")
    assert status == EXIT_DAMAGED, out
    assert f"damaged: added (in 2 snapshots: {second}, {third}): content differs" in out
    status, out = text_of(config, "verify", "--remote", "nas", "--json", first)
    assert status == 0 and json.loads(out)["checked"] == [first]


@pytest.mark.integration
@requires_sshd
def test_versions_and_diff_of_remote_snapshots_and_a_snapshot_without_manifest(sshd: SshServer, tmp_path: Path) -> None:
    config, source, repo, first, second = two_snapshots(sshd, tmp_path)
    status, out = text_of(config, "versions", "--remote", "nas", "--json", str(source / "dir" / "changes"))
    assert status == 0, out
    found = json.loads(out)["versions"]
    assert [(v["first"], v["last"], v["size"]) for v in found] == [(first, first, 3), (second, second, 11)]
    status, out = text_of(config, "versions", "--remote", "nas", "--json", str(source / "f-it's"))
    assert [(v["first"], v["last"]) for v in json.loads(out)["versions"]] == [(first, second)]
    status, out = text_of(config, "versions", "--remote", "nas", "--json", str(source / "dir"))
    assert [v["kind"] for v in json.loads(out)["versions"]] == ["directory", "directory"]
    status, out = text_of(config, "diff", "--remote", "nas", "--json")
    assert status == 0, out
    changes = {(c["path"], c["change"], c["what"]) for c in json.loads(out)["changes"]}
    assert changes == {
        (str(source / "dir" / "changes"), "changed", "content"),
        (str(source / "f-plain"), "removed", None),
        (str(source / "added"), "added", None),
    }
    status, out = text_of(config, "diff", "--repository", f"127.0.0.1:{repo}", first, second)
    assert status == 0 and out.splitlines()[-1] == "1 added, 1 removed, 1 changed", out
    # a snapshot made before remote manifests existed: said so, not a failure and not damage
    old = repo / "metadata" / f"{first}.json"
    data = json.loads(old.read_text())
    data["manifest"] = {"error": "not recorded: the repository is remote"}
    old.write_text(json.dumps(data))
    (repo / "metadata" / f"{first}.manifest").unlink()
    status, out = text_of(config, "verify", "--remote", "nas", first)
    assert status == EXIT_UNVERIFIED
    assert out.strip() == f"NOT VERIFIED: no snapshot could be checked; not checked: {first} (no manifest: not recorded: the repository is remote)"


# -- an rsync daemon -----------------------------------------------------------------


@pytest.fixture(scope="module")
def rsyncd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RsyncDaemon]:
    if os.geteuid() != 0:
        pytest.skip(reason="needs root: the daemon keeps owners as uid root")
    with running_rsyncd(tmp_path_factory.mktemp("rsyncd")) as daemon:
        yield daemon


@pytest.mark.integration
def test_restore_from_an_rsync_daemon_byte_for_byte(rsyncd: RsyncDaemon, tmp_path: Path) -> None:
    source = tmp_path / "source"
    (source / "tree" / "deeper").mkdir(parents=True)
    for name in NAMES:
        (source / "tree" / ("f-" + name)).write_bytes(os.urandom(300) + name.encode())
    (source / "tree" / "deeper" / "big").write_bytes(os.urandom(1 << 20))
    (source / "tree" / "deeper" / "big").chmod(0o640)
    os.symlink("deeper/big", source / "tree" / "link")
    (source / "lone").write_text("lone file")
    config = tmp_path / "config.toml"
    (tmp_path / "state").mkdir()
    config.write_text(
        '[backup]\nionice = "none"\nnice = 0\n[rotation]\nhourly = "always"\n'
        f'[system]\nstate_dir = "{tmp_path / "state"}"\n' + rsyncd.config()
    )
    url = f"rsync://backup@127.0.0.1:{rsyncd.port}/repo"
    status, _ = text_of(config, "backup", "--no-sudo", "--json", str(source), url)
    assert status == 0
    snapshot = os.readlink(rsyncd.module_path / "latest")
    into = tmp_path / "restored"
    into.mkdir()
    status, out = text_of(config, "restore", "--repository", url, "--to", str(into), str(source / "tree"), str(source / "lone"))
    assert status == 0, out
    # (the module's own copy of the link is munged by the daemon, "/rsyncd-munged/..."; read back through it, it is not)
    assert describe(into / "tree") == describe(source / "tree")
    assert os.readlink(rsyncd.module_path / snapshot / "tree" / "link").endswith("deeper/big")
    for path in (source / "tree").rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert (into / "tree" / path.relative_to(source / "tree")).read_bytes() == path.read_bytes()
    assert (into / "lone").read_text() == "lone file"
    # --remote NAME names the module too; a path no snapshot holds is one line
    (tmp_path / "again").mkdir()
    status, out = text_of(config, "restore", "--remote", "daemon", "--to", str(tmp_path / "again"), str(source / "nothing"))
    assert status == EXIT_USAGE and os.listdir(tmp_path / "again") == []
    # versions, diff and verify cannot ask a daemon anything: exit 8, and what to do
    status, _ = text_of(config, "verify", "--repository", url)
    assert status == EXIT_NOT_AVAILABLE
