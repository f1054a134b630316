"""Several sources in one snapshot (agent.engine.source_set): stored, linked and read back by their live paths.

The integration test mounts real filesystems on loop devices the way a
server has them: a system filesystem (ext4), an EFI partition inside it at
boot/efi (ext4 stands in for FAT, which this kernel cannot mount) and a
data filesystem at srv/data (btrfs, so that source is also read frozen),
plus a directory of the system filesystem that is a source of its own. A snapshot of one source made
before keeps today's layout in the same repository, and versions, diff and
restore read both layouts by live paths. The rules (directory names,
nested sources kept out, links across layouts, malformed metadata) are
pure and tested directly.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from agent.cli import main
from agent.config.model import DEFAULT_SYSTEM_EXCLUDES, SourceSpec
from agent.config.source_names import directory_for, directory_problem
from agent.config.validate import settings_from_mapping
from agent.core.errors import ConfigError
from agent.engine import history
from agent.engine.source_set import covering, nested_filter_rules, part_link_dests, spec_excludes, stored_parts
from tests.loopfs import mounted, need_root_and_tools

FAST = '[backup]\nionice = "none"\nnice = 0\n[rotation]\nhourly = "always"\n'


# -- pure rules -----------------------------------------------------------------------


def test_directory_names_follow_the_path_and_leave_dot_names_to_the_backup() -> None:
    assert directory_for("/") == "root"
    assert directory_for("/boot/efi") == "boot-efi"
    assert directory_for("/srv/data") == "srv-data"
    assert directory_problem("srv-data") is None
    reserved = directory_problem(".backup-agent")
    assert reserved is not None and ".backup-agent is reserved" in reserved
    assert directory_problem("a b") is not None and directory_problem("../x") is not None


def _config(sources: list[dict[str, Any]], backup: dict[str, Any] | None = None) -> Any:
    data: dict[str, Any] = {"source": sources}
    if backup is not None:
        data["backup"] = backup
    return settings_from_mapping(data, "/etc/backup-agent/config.toml")


def test_source_tables_are_read_with_their_own_settings() -> None:
    settings = _config(
        [
            {"path": "/"},
            {"path": "/boot/efi", "name": "efi", "one_file_system": False, "freeze": "never"},
            {"path": "/srv/data", "exclude": ["/tmp/*"], "freeze": "always"},
        ]
    )
    assert settings.sources == (
        SourceSpec(path="/", directory="root"),
        SourceSpec(path="/boot/efi", directory="efi", one_file_system=False, freeze="never"),
        SourceSpec(path="/srv/data", directory="srv-data", exclude=("/tmp/*",), freeze="always"),
    )
    assert spec_excludes(settings.sources[0]) == DEFAULT_SYSTEM_EXCLUDES
    assert spec_excludes(settings.sources[2]) == ("/tmp/*",)


@pytest.mark.parametrize(
    ("sources", "backup", "key", "words"),
    [
        ([{"path": "/srv/a-b"}, {"path": "/srv/a/b"}], None, "source[1].name", "already source[0]'s"),
        ([{"path": "/srv", "name": ".backup-agent"}], None, "source[0].name", ".backup-agent is reserved"),
        ([{"path": "/srv/data set"}], None, "source[0].path", "set name"),
        ([{"path": "/srv"}, {"path": "/srv/"}], None, "source[1].path", "already source[0]"),
        ([{"path": "/srv"}], {"source": "/"}, "backup.source", "given beside [[source]]"),
        ([{"path": "/srv"}], {"exclude": []}, "backup.exclude", "given beside [[source]]"),
        ([{"path": "/srv", "freeze": "sometimes"}], None, "source[0].freeze", '"auto", "always", "never"'),
        ([{"name": "x"}], None, "source[0].path", "missing"),
        ([], None, "source", "at least one [[source]]"),
    ],
)
def test_bad_source_tables_are_refused_by_key(
    sources: list[dict[str, Any]], backup: dict[str, Any] | None, key: str, words: str
) -> None:
    with pytest.raises(ConfigError) as info:
        _config(sources, backup)
    assert info.value.key == key and words in info.value.problem, info.value.problem


def test_a_source_inside_another_is_kept_out_of_it_with_its_directory_kept() -> None:
    assert nested_filter_rules("/", ["/", "/boot/efi", "/srv/da*ta", "/srvx"]) == (
        "--exclude=/boot/efi/*",
        "--exclude=/srv/da\\*ta/*",
        "--exclude=/srvx/*",
    )
    assert nested_filter_rules("/srv", ["/", "/srv", "/srvx"]) == ()


def test_malformed_sources_in_metadata_read_as_one_source() -> None:
    good = {"sources": [{"path": "/", "directory": "root"}, {"path": "/srv/data/", "directory": "srv-data"}]}
    assert stored_parts(good) == (("/", "root"), ("/srv/data", "srv-data"))
    assert covering(stored_parts(good), "/srv/data/x") == ("/srv/data", "srv-data")
    assert covering(stored_parts(good), "/srv/datax") == ("/", "root")
    for bad in (
        {"sources": [{"path": "/", "directory": "../../etc"}, {"path": "/srv", "directory": "srv"}]},
        {"sources": [{"path": "/", "directory": ".backup-agent"}, {"path": "/srv", "directory": "srv"}]},
        {"sources": [{"path": "relative", "directory": "a"}, {"path": "/srv", "directory": "srv"}]},
        {"sources": "root"},
        {"sources": [{"path": "/", "directory": ""}]},
    ):
        assert stored_parts(bad) == (), bad


def test_links_follow_a_source_across_layouts(tmp_path: Path) -> None:
    one = tmp_path / "one"  # a snapshot of /srv alone
    several = tmp_path / "several"  # a snapshot of / and /srv
    (one / "x").mkdir(parents=True)
    (several / "srv").mkdir(parents=True)
    (several / "root").mkdir()
    metadata: dict[str, dict[str, Any]] = {
        str(one): {"source": "/srv"},
        str(several): {"sources": [{"path": "/", "directory": "root"}, {"path": "/srv", "directory": "srv"}]},
    }
    links = part_link_dests([str(one), str(several)], "data", "/srv", lambda d: metadata[d])
    assert links == [str(one), str(several / "srv")]
    # A source the earlier snapshot of several did not hold has nothing to link to there.
    assert part_link_dests([str(several)], "boot", "/boot", lambda d: metadata[d]) == []
    # One source after several: the same source's directory, not the whole tree.
    assert part_link_dests([str(several)], "", "/", lambda d: metadata[d]) == [str(several / "root")]


# -- real filesystems -----------------------------------------------------------------


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> Any:
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.integration
def test_several_filesystems_make_one_snapshot_read_back_by_live_paths(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    need_root_and_tools("ext4", "btrfs")
    live, repo, images = tmp_path / "live", tmp_path / "repo", tmp_path / "images"
    efi, data, keep = live / "boot" / "efi", live / "srv" / "data", live / "home" / "u" / "keep"
    with contextlib.ExitStack() as stack:
        stack.enter_context(mounted(images, "ext4", live))
        stack.enter_context(mounted(images, "ext4", efi))
        stack.enter_context(mounted(images, "btrfs", data))
        (live / "etc").mkdir()
        (live / "etc" / "hostname").write_text("server\n")
        keep.mkdir(parents=True)
        (keep / "notes.txt").write_text("kept in its own source\n")
        (efi / "EFI").mkdir()
        (efi / "EFI" / "grub.cfg").write_text("set timeout=5\n")
        (data / "db").mkdir()
        (data / "db" / "table.dat").write_bytes(b"rows" * 1000)

        # Before: a snapshot of the one source, in today's layout.
        single = tmp_path / "single.toml"
        single.write_text(FAST)
        assert main(["backup", "--no-sudo", "-q", "-b", "-s", "--config", str(single), str(live), str(repo)]) == 0
        several = tmp_path / "several.toml"
        several.write_text(
            FAST
            + f'[[source]]\npath = "{live}"\nname = "system"\n'
            + f'[[source]]\npath = "{efi}"\nname = "efi"\n'
            + f'[[source]]\npath = "{data}"\n'
            + f'[[source]]\npath = "{keep}"\nname = "keep"\n'
        )
        backup = ["backup", "--no-sudo", "-q", "-b", "-s", "--config", str(several), str(repo)]
        assert main(backup) == 0
        (efi / "EFI" / "grub.cfg").write_text("set timeout=1\n")
        later_time = (efi / "EFI" / "grub.cfg").stat().st_mtime + 10  # rsync's quick check looks at whole seconds
        os.utime(efi / "EFI" / "grub.cfg", (later_time, later_time))
        assert main(backup) == 0

        assert main([*backup[:4], "-n", *backup[4:]]) == 0  # a dry run reads every source and writes nothing
        first, one, two = sorted(os.listdir(repo / "snapshots"))
        top = repo / "snapshots" / one
        data_dir = directory_for(str(data))
        assert sorted(os.listdir(top)) == sorted(["system", "efi", data_dir, "keep"])
        assert (top / "system" / "etc" / "hostname").read_text() == "server\n"
        assert (top / "efi" / "EFI" / "grub.cfg").read_text() == "set timeout=5\n"
        assert (top / data_dir / "db" / "table.dat").read_bytes() == b"rows" * 1000
        assert (top / "keep" / "notes.txt").is_file()
        # Other filesystems, and the source inside the system one, leave only their (empty) directory there.
        for empty in ("boot/efi", "srv/data", "home/u/keep"):
            assert os.listdir(top / "system" / empty) == [], empty
        metadata = json.loads((repo / "metadata" / f"{one}.json").read_text())
        assert "source" not in metadata
        assert [(s["path"], s["directory"]) for s in metadata["sources"]] == [
            (str(live), "system"), (str(efi), "efi"), (str(data), data_dir), (str(keep), "keep")
        ]
        assert metadata["sources"][0]["skipped_mounts"] == [str(efi), str(data)]
        assert [s["frozen"] for s in metadata["sources"]] == [False, False, True, False]
        assert metadata["statistics"]["files"] == sum(s["statistics"]["files"] for s in metadata["sources"])
        later = repo / "snapshots" / two
        # Unchanged files are links to the snapshot before, source by source, also across the change of layout.
        assert (later / data_dir / "db" / "table.dat").stat().st_ino == (top / data_dir / "db" / "table.dat").stat().st_ino
        hostname = (repo / "snapshots" / first / "etc" / "hostname").stat().st_ino
        assert (top / "system" / "etc" / "hostname").stat().st_ino == hostname

        versions = _json(capsys, ["versions", "--json", "--repository", str(repo), str(efi / "EFI" / "grub.cfg")])
        assert [(v["first"], v["last"]) for v in versions["versions"]] == [(one, one), (two, two)]
        versions = _json(capsys, ["versions", "--json", "--repository", str(repo), str(live / "etc" / "hostname")])
        assert [v["snapshots"] for v in versions["versions"]] == [[first, one, two]]

        changes = _json(capsys, ["diff", "--json", "--repository", str(repo), one, two])
        assert [(c["path"], c["change"], c["what"]) for c in changes["changes"]] == [
            (str(efi / "EFI" / "grub.cfg"), "changed", "content")
        ]
        assert main(["diff", "--repository", str(repo), first, one]) != 0
        assert "cannot be compared" in capsys.readouterr().err

        out = tmp_path / "out"
        out.mkdir()
        assert main(["restore", "-q", "--repository", str(repo), "--to", str(out), str(data / "db" / "table.dat")]) == 0
        assert (out / "table.dat").read_bytes() == b"rows" * 1000
        assert main(["restore", "-q", "--repository", str(repo), "--snapshot", first, "--to", str(out),
                     str(live / "etc")]) == 0
        assert (out / "etc" / "hostname").read_text() == "server\n"


def test_narrow_gives_each_snapshot_as_the_part_that_holds_a_path() -> None:
    snaps = [
        history.Snapshot("a", "/r/snapshots/a", "/", False),
        history.Snapshot("b", "/r/snapshots/b", "/", False, parts=(("/", "root"), ("/boot/efi", "efi"))),
    ]
    narrowed = history.narrow(snaps, "/boot/efi/EFI")
    assert [(s.path, s.source) for s in narrowed] == [("/r/snapshots/a", "/"), ("/r/snapshots/b/efi", "/boot/efi")]
    assert history.narrow(snaps, "/etc")[1].path == "/r/snapshots/b/root"
