"""The pure parts of the off-site copy: restic's argv and output (agent.engine.restic), the
decisions of agent.engine.offsite, and [[offsite]] validation (agent.config.offsite).

The lines parsed here are restic 0.14's own, as it printed them on this machine.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from agent.config.model import DEFAULT_OFFSITE_INTERVAL, Offsite, Settings
from agent.config.validate import settings_from_mapping
from agent.core.errors import ConfigError, UsageError
from agent.core import events
from agent.engine import offsite, restic
from agent.policy.rotation import Scheme

UTC = dt.timezone.utc
NOW = dt.datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
SITE = Offsite(name="far", repository="/srv/restic", password_file="/etc/pw")

STATUS = (
    '{"message_type":"status","seconds_elapsed":2,"seconds_remaining":6,"percent_done":0.25,"total_files":40,'
    '"files_done":10,"total_bytes":4000,"bytes_done":1000,"error_count":1,"current_files":["/docs/a","/docs/b"]}'
)
SUMMARY = (
    '{"message_type":"summary","files_new":50,"files_changed":2,"files_unmodified":7,"dirs_new":2,"dirs_changed":0,'
    '"dirs_unmodified":0,"data_blobs":50,"tree_blobs":3,"data_added":17846,"total_files_processed":59,'
    '"total_bytes_processed":141,"total_duration":0.215970416,"snapshot_id":"7aece025"}'
)
SNAPSHOTS = (
    '[{"time":"2026-01-01T10:00:00.123456789Z","tree":"e5","paths":["/run/backup-agent-offsite/snapshot"],"hostname":"h",'
    '"username":"root","tags":["backup-agent","2026-01-01T10-00-00+0000"],"id":"7aece025d8143cff","short_id":"7aece025"},'
    '{"time":"2025-12-31T09:00:00+01:00","tree":"e6","paths":["/x"],"hostname":"h","username":"root","id":"10dac837aa",'
    '"short_id":"10dac837"}]'
)


def test_the_version_line_and_the_minimum() -> None:
    assert restic.parse_version("restic 0.14.0 compiled with go1.19.8 on linux/amd64") == (0, 14, 0)
    assert restic.version_problem((0, 14, 0)) is None and restic.version_problem((0, 16, 4)) is None
    assert "too old" in (restic.version_problem((0, 13, 1)) or "")
    assert restic.version_problem(restic.parse_version("rustic 1")) is not None


def test_networkmanagers_metered_values_read_from_busctl() -> None:
    from agent.engine.metered import busctl_argv, parse_metered

    assert [parse_metered(f"u {n}\n") for n in range(6)] == [None, True, False, True, False, None]
    assert parse_metered("") is None and parse_metered("s \"1\"") is None and parse_metered("u x") is None
    assert busctl_argv("/usr/bin/busctl")[1:3] == ("--system", "get-property") and busctl_argv()[-1] == "Metered"


def test_a_stall_is_the_same_status_for_the_whole_limit() -> None:
    watch = restic.StallWatch(10)
    moving = [restic.Status(percent=50.0, bytes_done=n, bytes_total=100, files_done=1, files_total=2, eta=None, errors=0,
                            current=None, elapsed=None) for n in (10, 20, 20, 20, 20)]
    seen = [watch.stalled(status, clock) for status, clock in zip(moving, (0.0, 5.0, 9.0, 14.9, 15.0))]
    assert seen == [False, False, False, False, True]  # unchanged since 5.0: stalled at 15.0, not before
    assert not watch.stalled(moving[0], 16.0)  # any change starts the count again


def test_a_status_line_becomes_our_progress_fields() -> None:
    status = restic.parse_backup_line(STATUS)
    assert status == restic.Status(25.0, 1000, 4000, 10, 40, 6, 1, "/docs/a", 2.0)
    assert isinstance(status, restic.Status)
    event = offsite.status_progress(status)
    line = events.decode(events.encode(event))
    assert line == event
    assert event.fields() == {
        "percent": 25.0, "bytes": 1000, "files": 10, "rate": 500.0, "eta": 6,
        "step": "offsite", "bytes_total": 4000, "files_total": 40, "errors": 1, "current": "/docs/a",
    }


def test_the_summary_and_an_unreadable_file_and_noise() -> None:
    summary = restic.parse_backup_line(SUMMARY)
    assert isinstance(summary, restic.Summary)
    assert (summary.snapshot_id, summary.files_new, summary.files_changed, summary.data_added, summary.files) == ("7aece025", 50, 2, 17846, 59)
    problem = restic.parse_backup_line('{"message_type":"error","error":{"message":"permission denied"},"during":"archival","item":"/a"}')
    assert problem == restic.Problem("/a", "permission denied")
    assert restic.parse_backup_line("open repository") is None
    assert restic.parse_backup_line('{"message_type":"verbose_status","action":"new"}') is None
    assert restic.parse_backup_line("[1, 2]") is None


def test_snapshots_are_read_oldest_first_with_nanoseconds_and_their_local_names() -> None:
    found = restic.parse_snapshots(SNAPSHOTS)
    assert [s.short_id for s in found] == ["10dac837", "7aece025"]
    assert found[1].time == dt.datetime(2026, 1, 1, 10, 0, 0, 123456, tzinfo=UTC)
    assert found[1].local_name == "2026-01-01T10-00-00+0000" and found[0].local_name is None
    assert restic.parse_snapshots("") == []
    with pytest.raises(ValueError):
        restic.parse_snapshots('{"not": "a list"}')


def test_find_output_is_one_match_per_snapshot() -> None:
    text = (
        '[{"matches":[{"path":"/a/f2","type":"file","size":2,"mtime":"2026-12-05T08:22:14Z"}],"hits":1,"snapshot":"aa"},'
        '{"matches":[{"path":"/a/f2","type":"file","size":4,"mtime":"2026-12-05T09:00:00Z"}],"hits":1,"snapshot":"bb"}]'
    )
    assert [(m.snapshot_id, m.size) for m in restic.parse_find(text)] == [("aa", 2), ("bb", 4)]


@pytest.mark.parametrize(
    ("lines", "reason"),
    [
        (["Fatal: wrong password or no key found"], "password"),
        (
            [
                'Fatal: unable to open config file: client.Head: Head "http://127.0.0.1:1/config": dial tcp 127.0.0.1:1: connect: connection refused',
                "Is there a repository at the following location?",
            ],
            "unreachable",
        ),
        (
            ["Fatal: unable to open config file: stat /srv/x/config: no such file or directory", "Is there a repository at the following location?"],
            "no-repository",
        ),
        (["unable to create lock in backend: repository is already locked by PID 4242 on laptop by root (UID 0, GID 0)"], "locked"),
        (["Save(<data/1234>) returned error: 507 Insufficient Storage"], "quota"),
        (["Fatal: unable to save snapshot: write /srv/x/data/12: no space left on device"], "quota"),
        (["blob not removed, server response: 403 Forbidden (403)"], "append-only"),
        (['Fatal: invalid id "932d7dcd": no matching ID found for prefix "932d7dcd"'], "no-parent"),
        (["something else entirely"], "failed"),
    ],
)
def test_failures_are_classified_from_what_restic_says(lines: list[str], reason: str) -> None:
    assert restic.classify(lines) == reason
    message = restic.explain(reason, lines)
    assert "\n" not in message and lines[-1][:40] in message


def test_a_refused_deletion_is_recognised_while_restic_still_retries() -> None:
    line = "Remove(<snapshot/ed380f3980>) returned error, retrying after 552.330144ms: blob not removed, server response: 403 Forbidden (403)"
    assert restic.refused_deletion(line)
    assert not restic.refused_deletion("Save(<data/12>) returned error, retrying after 1s: 500 Internal Server Error")
    assert restic.final_retry(line) == "append-only"
    full = "Save(<data/0f1e2d3c>) returned error, retrying after 720ms: write /srv/r/data/0f/0f1e: no space left on device"
    assert restic.final_retry(full) == "quota"
    assert restic.final_retry("Save(<data/12>) returned error, retrying after 1s: 500 Internal Server Error") is None


def test_the_backup_argv_carries_the_mapping_to_the_local_snapshot() -> None:
    moment = dt.datetime(2026, 12, 5, 8, 26, 39, tzinfo=UTC)
    argv = restic.backup_argv("/usr/bin/restic", host="laptop", snapshot="2026-12-05T08-26-39+0000", moment=moment, parent="7aece025")
    assert argv[:3] == ("/usr/bin/restic", "backup", "--json") and argv[-1] == "."
    pairs = dict(zip(argv, argv[1:]))
    assert pairs["--host"] == "laptop" and pairs["--parent"] == "7aece025"
    assert pairs["--time"] == "2026-12-05 08:26:39"
    east = moment.astimezone(dt.timezone(dt.timedelta(hours=2)))
    assert restic.backup_argv("r", host="h", snapshot="s", moment=east, parent=None)[argv.index("--time") + 1] == "2026-12-05 08:26:39"
    assert restic.environment(SITE, "/c", {})["TZ"] == "UTC"
    assert "--ignore-ctime" in argv and argv.count("--tag") == 2 and "backup-agent" in argv
    assert "--parent" not in restic.backup_argv("r", host="h", snapshot="s", moment=moment, parent=None)


def test_no_secret_is_ever_on_an_argv_and_credentials_cannot_redirect_restic() -> None:
    site = Offsite(name="far", repository_file="/etc/repo", password_command=("/usr/bin/pass", "show", "restic key"))
    env = restic.environment(site, "/var/lib/backup-agent/restic-cache", {"AWS_SECRET_ACCESS_KEY": "s3cr3t", "RESTIC_REPOSITORY": "/tmp/evil"})
    assert env["RESTIC_REPOSITORY_FILE"] == "/etc/repo" and "RESTIC_REPOSITORY" not in env
    assert env["RESTIC_PASSWORD_COMMAND"] == "/usr/bin/pass show 'restic key'"
    assert env["AWS_SECRET_ACCESS_KEY"] == "s3cr3t"
    moment = dt.datetime(2026, 1, 1, tzinfo=UTC)
    for argv in (
        restic.backup_argv("r", host="h", snapshot="s", moment=moment, parent=None),
        restic.forget_argv("r", "h", Scheme(counts={"daily": 7})),
        restic.check_argv("r", 1, 12),
        restic.init_argv("r"),
        restic.with_options(restic.snapshots_argv("r", "h"), site),
    ):
        assert not any("s3cr3t" in word or "/etc/repo" in word or "pass" in word for word in argv)


def test_backend_options_and_limits_go_before_every_command() -> None:
    site = Offsite(name="far", repository="sftp:b@h:/r", password_file="/p", options=("sftp.command=/usr/bin/ssh -i /k b@h -s sftp",), pack_size=16)
    assert restic.with_options(restic.check_argv("/usr/bin/restic", 1, 4), site) == (
        "/usr/bin/restic", "-o", "sftp.command=/usr/bin/ssh -i /k b@h -s sftp", "--pack-size", "16", "check", "--read-data-subset=1/4",
    )


def test_the_environment_file_format() -> None:
    text = "# backend\nexport AWS_ACCESS_KEY_ID=abc\nAWS_SECRET_ACCESS_KEY='x y'\n\nB2_ACCOUNT_KEY=\"k=v\"\n"
    assert restic.parse_environment_file(text, "f") == {"AWS_ACCESS_KEY_ID": "abc", "AWS_SECRET_ACCESS_KEY": "x y", "B2_ACCOUNT_KEY": "k=v"}
    with pytest.raises(ValueError, match="f:2"):
        restic.parse_environment_file("A=1\nnot a line\n", "f")


def test_keep_options_map_the_rotation_scheme() -> None:
    scheme = Scheme(counts={"hourly": 24, "daily": 7, "monthly": "always"})
    assert restic.keep_options(scheme) == ("--keep-hourly", "24", "--keep-daily", "7", "--keep-monthly", str(restic.ALWAYS))
    argv = restic.forget_argv("r", "h", scheme, keep_last=3)
    assert argv[argv.index("--keep-last") + 1] == "3" and "--prune" not in argv


def test_the_rolling_check_reads_every_part_in_turn() -> None:
    parts, seen, previous = 4, [], None
    for _ in range(9):
        previous = restic.next_part(previous, parts)
        seen.append(previous)
    assert seen == [1, 2, 3, 4, 1, 2, 3, 4, 1]
    assert restic.check_argv("r", 3, 4) == ("r", "check", "--read-data-subset=3/4")
    assert restic.next_part(None, 0) == 0 and restic.check_argv("r", 0, 0) == ("r", "check")


def _state(**fields: Any) -> offsite.State:
    return offsite.State(id="abc", **fields)


def test_when_a_copy_is_skipped() -> None:
    newest = "2026-12-05T11-00-00+0000"
    assert offsite.skip_reason(SITE, _state(), newest=newest, now=NOW, metered=None) is None
    assert "no complete local snapshot" in (offsite.skip_reason(SITE, _state(), newest=None, now=NOW, metered=None) or "")
    assert "init --offsite far" in (offsite.skip_reason(SITE, offsite.State(), newest=newest, now=NOW, metered=None) or "")
    assert "metered" in (offsite.skip_reason(SITE, _state(), newest=newest, now=NOW, metered=True) or "")
    allowed = Offsite(name="far", repository="/r", password_file="/p", metered=True)
    assert offsite.skip_reason(allowed, _state(), newest=newest, now=NOW, metered=True) is None
    recent = _state(last_copy=(NOW - dt.timedelta(hours=3)).isoformat(), snapshot="older")
    assert "3h old" in (offsite.skip_reason(SITE, recent, newest=newest, now=NOW, metered=False) or "")
    stale = _state(last_copy=(NOW - dt.timedelta(seconds=DEFAULT_OFFSITE_INTERVAL)).isoformat(), snapshot="older")
    assert offsite.skip_reason(SITE, stale, newest=newest, now=NOW, metered=False) is None
    # A failed copy is due again at once; one already copied is not.
    failed = _state(last_copy=(NOW - dt.timedelta(hours=3)).isoformat(), snapshot="older", last_failure="unreachable")
    assert offsite.skip_reason(SITE, failed, newest=newest, now=NOW, metered=None) is None
    done = _state(last_copy=(NOW - dt.timedelta(days=3)).isoformat(), snapshot=newest)
    assert "already copied" in (offsite.skip_reason(SITE, done, newest=newest, now=NOW, metered=None) or "")


def test_the_recorded_copy_is_the_parent_only_while_the_record_is_whole() -> None:
    copied = _state(last_copy=NOW.isoformat(), snapshot="2026-12-05T11-00-00+0000", offsite_id="932d7dcd")
    assert offsite.recorded_parent(copied) == "932d7dcd"
    # After a failure (a stopped restic may have made its snapshot), before any copy, or before init: listed instead.
    assert offsite.recorded_parent(_state(snapshot="s", offsite_id="932d7dcd", last_failure="stopped")) is None
    assert offsite.recorded_parent(_state()) is None
    assert offsite.recorded_parent(offsite.State(snapshot="s", offsite_id="932d7dcd")) is None


def test_a_malformed_state_file_reads_as_empty() -> None:
    assert offsite.parse_state(b"\xff not json") == offsite.State()
    assert offsite.parse_state(b'{"id": 5, "check_part": true, "append_only": "yes"}') == offsite.State()
    state = offsite.parse_state(b'{"id": "abc", "check_part": 3, "append_only": true}')
    assert (state.id, state.check_part, state.append_only) == ("abc", 3, True)


def test_live_paths_map_to_the_off_site_tree_and_snapshots_are_chosen() -> None:
    home = Settings(path=None, source="/home")
    assert offsite.offsite_path(home, "/home/alice/a.txt") == "/alice/a.txt"
    assert offsite.offsite_path(Settings(path=None, source="/"), "/etc/hosts") == "/etc/hosts"
    with pytest.raises(UsageError):
        offsite.offsite_path(home, "/etc/hosts")
    found = restic.parse_snapshots(SNAPSHOTS)
    assert offsite.choose(found, name=None, at=None).short_id == "7aece025"
    assert offsite.choose(found, name="2026-01-01T10-00-00+0000", at=None).short_id == "7aece025"
    assert offsite.choose(found, name=None, at=dt.datetime(2026, 1, 1, tzinfo=UTC)).short_id == "10dac837"
    with pytest.raises(UsageError):
        offsite.choose(found, name=None, at=dt.datetime(2020, 1, 1, tzinfo=UTC))
    with pytest.raises(UsageError):
        offsite.choose([], name=None, at=None)


def _config(**table: Any) -> dict[str, Any]:
    return {"rotation": {"daily": 3}, "offsite": [{"name": "far", "repository": "/srv/r", "password_file": "/etc/pw", **table}]}


def test_the_offsite_table_and_its_defaults() -> None:
    settings = settings_from_mapping(_config(), "c.toml")
    (site,) = settings.offsite
    assert site.rotation == settings.rotation  # the local scheme by default
    assert (site.interval, site.metered, site.append_only, site.keep_last) == (86400, False, False, 1)
    site = settings_from_mapping(_config(rotation={"weekly": 4, "last": 2}, interval="6h", repository="sftp:u@h:/r"), "c.toml").offsite[0]
    assert site.rotation.counts == {"weekly": 4} and site.keep_last == 2 and site.interval == 21600 and site.repository == "sftp:u@h:/r"


@pytest.mark.parametrize(
    ("table", "words"),
    [
        ({"repository": "ftp://x"}, "expected a restic repository"),
        ({"repository_file": "/etc/r"}, "exactly one of repository"),
        ({"password_command": ["/bin/echo", "x"]}, "exactly one of password_file"),
        ({"password_file": "relative"}, "relative path"),
        ({"interval": 3600}, "duration"),
        ({"pack_size": 1}, "MiB from 4"),
        ({"rotation": {"daily": 0}}, "only counts of 0"),
        ({"rotation": {"dayly": 3}}, "unknown key"),
        ({"colour": "blue"}, "unknown key"),
        ({"options": "sftp.command=x"}, "an array of restic options"),
        ({"options": ["--no-lock"]}, "an array of restic options"),
    ],
)
def test_a_wrong_offsite_table_is_one_line_naming_the_key(table: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_mapping(_config(**table), "c.toml")
    assert words in str(info.value) and "offsite[0]" in str(info.value) and "\n" not in str(info.value)


def test_two_offsites_need_names_of_their_own() -> None:
    data = _config()
    data["offsite"].append(dict(data["offsite"][0]))
    with pytest.raises(ConfigError, match="a second time"):
        settings_from_mapping(data, "c.toml")
