"""Reports beyond the desktop (agent.engine.reports, agent.engine.stale, check-stale).

Real parts: an SMTP server (aiosmtpd) on 127.0.0.1 that speaks STARTTLS
with a self-signed certificate made here by openssl and checks logins; an
HTTP server (http.server) on 127.0.0.1 that records pings and can hang;
real backup cycles (real rsync, files, repository). Ports are asked from the
kernel; every server is stopped by the test that started it.
"""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import json
import logging
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest

from agent import cli
from agent.config.load import load_settings
from agent.config.model import MailReport, PingReport
from agent.config.trust import Distrust, read_secret
from agent.core.commands import Runner
from agent.core.errors import EXIT_OK, EXIT_STALE, EXIT_USAGE
from agent.core.events import complete, error, step, warning
from agent.engine import channels, reports, stale
from agent.engine.cycle import Cycle, Request

aiosmtpd_controller = pytest.importorskip("aiosmtpd.controller", reason="aiosmtpd missing: pip install -e '.[test]'")
aiosmtpd_smtp = pytest.importorskip("aiosmtpd.smtp", reason="aiosmtpd missing: pip install -e '.[test]'")

FAST = '[backup]\nionice = "none"\nnice = 0\n[rotation]\nhourly = "always"\n'
USER, PASSWORD = "backup", "s3cret-Pa55word"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# -- an SMTP server with STARTTLS and logins ------------------------------------------------


@dataclass
class Mailbox:
    messages: list[email.message.EmailMessage] = field(default_factory=list)
    logins: list[tuple[str, bool]] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        parsed = email.message_from_bytes(envelope.original_content, policy=email.policy.default)
        self.messages.append(parsed)  # type: ignore[arg-type]
        return "250 OK"


@dataclass
class SmtpServer:
    port: int
    mailbox: Mailbox
    certificate: Path


@pytest.fixture
def certificate(trusted_dir: Path) -> Path:
    """A self-signed certificate for 127.0.0.1, made by openssl (an EC key: fast), where root alone can change it."""
    if shutil.which("openssl") is None:
        pytest.skip(reason="openssl missing (apt-get install openssl)")
    cert, key = trusted_dir / "cert.pem", trusted_dir / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return cert


@pytest.fixture
def smtp_server(certificate: Path) -> Iterator[SmtpServer]:
    """aiosmtpd on 127.0.0.1: STARTTLS required, logins only over TLS, one user with one password."""
    mailbox = Mailbox()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(certificate), str(certificate.with_name("key.pem")))

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> Any:
        ok = isinstance(data, aiosmtpd_smtp.LoginPassword) and (data.login, data.password) == (USER.encode(), PASSWORD.encode())
        mailbox.logins.append((data.login.decode() if ok or hasattr(data, "login") else "?", ok))
        return aiosmtpd_smtp.AuthResult(success=ok, handled=False)  # handled=False: the server answers 535 itself

    port = free_port()
    controller = aiosmtpd_controller.Controller(
        mailbox, hostname="127.0.0.1", port=port, tls_context=context, require_starttls=True,
        auth_required=True, authenticator=authenticator,
    )  # fmt: skip
    controller.start()
    try:
        yield SmtpServer(port, mailbox, certificate)
    finally:
        controller.stop()


# -- an HTTP server that records pings and can hang -----------------------------------------


@dataclass
class PingServer:
    port: int
    pings: list[tuple[str, str]]
    release: threading.Event

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture
def ping_server() -> Iterator[PingServer]:
    pings: list[tuple[str, str]] = []
    release = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
            if self.path.startswith("/hang"):
                release.wait(30)  # far longer than any timeout the tests give
            pings.append((self.path, body))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield PingServer(server.server_address[1], pings, release)
    finally:
        release.set()
        server.shutdown()
        server.server_close()
        thread.join(10)


# -- a real cycle reporting -------------------------------------------------------------------


def _config(tmp: Path, rsync_path: str, reports_toml: str) -> str:
    config = tmp / "config.toml"
    state = tmp / "state"
    config.write_text(FAST + f'[commands]\nrsync = "{rsync_path}"\n[system]\nstate_dir = "{state}"\n' + reports_toml)
    return str(config)


def _mail_toml(server: SmtpServer, password_file: Path, on: str = '["failure", "success"]') -> str:
    return (
        f'[[report]]\ntype = "mail"\nhost = "127.0.0.1"\nport = {server.port}\nsecurity = "starttls"\n'
        f'ca_file = "{server.certificate}"\nuser = "{USER}"\npassword_file = "{password_file}"\n'
        f'from = "backup@example.org"\nto = ["admin@example.org"]\non = {on}\ntimeout = "5s"\n'
    )


def _ping_toml(url: str, timeout: str = "5s") -> str:
    return f'[[report]]\ntype = "ping"\nurl = "{url}"\ntimeout = "{timeout}"\n'


def _password(directory: Path, text: str = PASSWORD, mode: int = 0o600) -> Path:
    path = directory / "smtp-password"
    path.write_text(text + "\n")
    path.chmod(mode)
    return path


def _run(config: str, source: Path, repository: Path) -> tuple[Any, float]:
    """A real cycle through the channels the backup command composes; (outcome or exception, seconds)."""
    settings = load_settings(config)
    request = Request(settings=settings, source=str(source), repository=str(repository))
    chosen = channels.backup_channels(None, settings, host="testhost", repository=str(repository))
    began = time.monotonic()
    result: Any
    try:
        with channels.reporting(chosen) as emitter:
            result = Cycle(request, emitter, Runner()).run()
    except Exception as exc:  # the cycle's own error, after the channels heard of it
        result = exc
    return result, time.monotonic() - began


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "src"
    path.mkdir()
    (path / "file").write_text("data\n")
    return path


@pytest.mark.integration
def test_a_cycle_reports_success_by_mail_over_starttls_and_by_ping(
    tmp_path: Path, trusted_dir: Path, rsync_path: str, source: Path, smtp_server: SmtpServer, ping_server: PingServer
) -> None:
    config = _config(tmp_path, rsync_path, _mail_toml(smtp_server, _password(trusted_dir)) + _ping_toml(ping_server.url("/check")))
    outcome, _ = _run(config, source, tmp_path / "repo")
    assert outcome.snapshot is not None
    (mail,) = smtp_server.mailbox.messages
    assert mail["Subject"] == f"backup-agent on testhost: snapshot {outcome.snapshot}"
    body = mail.get_content().replace("\r\n", "\n")
    assert f"made snapshot {outcome.snapshot}" in body and "files: 2, changed: 1 (5 B)" in body
    assert smtp_server.mailbox.logins == [(USER, True)]
    assert [path for path, _ in ping_server.pings] == ["/check/start", "/check"]
    record = stale.read_record(str(tmp_path / "state"))
    assert record is not None and (record.snapshot, record.repository) == (outcome.snapshot, str(tmp_path / "repo"))


@pytest.mark.integration
def test_a_failed_cycle_reports_the_step_its_hint_and_the_log_tail(
    tmp_path: Path, trusted_dir: Path, rsync_path: str, source: Path, smtp_server: SmtpServer, ping_server: PingServer,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    repository = tmp_path / "repo"
    repository.mkdir()
    (repository / "someone-elses-file").write_text("not a repository\n")
    config = _config(tmp_path, rsync_path, _mail_toml(smtp_server, _password(trusted_dir)) + _ping_toml(ping_server.url("/check")))
    caplog.set_level(logging.INFO, logger="agent")
    failure, _ = _run(config, source, repository)
    assert failure.step == "prepare" and failure.exit_code == 3
    (mail,) = smtp_server.mailbox.messages
    assert mail["Subject"] == "backup-agent on testhost: backup FAILED at the prepare step"
    body = mail.get_content().replace("\r\n", "\n")
    assert f"step: prepare\nwhat happened and what to do: {failure.message}" in body and "exit status 3" in body
    assert [path for path, _ in ping_server.pings] == ["/check/start", "/check/fail"]
    fail_body = ping_server.pings[1][1]
    assert failure.message in fail_body and "log (last lines):\nlock: start\nlock: done\nprepare: start\nerror (prepare): " in fail_body
    assert not (tmp_path / "state").exists()  # no success, no record


@pytest.mark.integration
def test_a_refused_login_is_logged_without_the_password_and_costs_nothing(
    tmp_path: Path, trusted_dir: Path, rsync_path: str, source: Path, smtp_server: SmtpServer, ping_server: PingServer,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    wrong = "not-the-Pa55word"
    config = _config(
        tmp_path, rsync_path, _mail_toml(smtp_server, _password(trusted_dir, wrong)) + _ping_toml(ping_server.url("/check"))
    )
    caplog.set_level(logging.INFO, logger="agent")
    outcome, _ = _run(config, source, tmp_path / "repo")
    assert outcome.snapshot is not None and os.path.isdir(tmp_path / "repo" / "snapshots" / outcome.snapshot)
    assert smtp_server.mailbox.messages == [] and smtp_server.mailbox.logins == [(USER, False)]
    (line,) = [r.getMessage() for r in caplog.records if "mail" in r.getMessage() and r.levelno == logging.ERROR]
    assert "the server refused the login of 'backup' (535" in line and "the backup goes on" in line
    assert wrong not in caplog.text and PASSWORD not in caplog.text
    assert [path for path, _ in ping_server.pings] == ["/check/start", "/check"]  # the other channel still heard


@pytest.mark.integration
def test_an_untrusted_certificate_or_a_readable_password_file_sends_nothing(
    tmp_path: Path, trusted_dir: Path, rsync_path: str, source: Path, smtp_server: SmtpServer, certificate: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    readable = _password(trusted_dir, mode=0o644)
    found = reports.verdict([complete("2026-12-05T08-00-00", statistics={})], None, "testhost")
    assert found is not None
    report = MailReport(
        host="127.0.0.1", sender="b@example.org", to=("a@example.org",), port=smtp_server.port,
        user=USER, password_file=str(readable), ca_file=str(certificate), on=("success",), timeout=5,
    )  # fmt: skip
    with caplog.at_level(logging.ERROR, logger="agent"):
        assert not reports.deliver(report, found)
        assert not reports.deliver(MailReport(**{**report.__dict__, "ca_file": None, "password_file": str(_password(trusted_dir))}), found)
    readable_line, tls_line = [r.getMessage() for r in caplog.records if r.name == "agent.engine.reports"]
    assert "refusing a file others could have changed or may read:" in readable_line
    assert "may be read by group or others (mode 0644); chmod 600 it" in readable_line
    assert "TLS failed (CERTIFICATE_VERIFY_FAILED)" in tls_line
    assert smtp_server.mailbox.messages == [] and smtp_server.mailbox.logins == []


@pytest.mark.integration
def test_a_hanging_ping_server_delays_the_backup_by_the_timeout_at_most(
    tmp_path: Path, rsync_path: str, source: Path, ping_server: PingServer, caplog: pytest.LogCaptureFixture
) -> None:
    baseline_config = _config(tmp_path, rsync_path, _ping_toml(ping_server.url("/check")))
    _, baseline = _run(baseline_config, source, tmp_path / "repo0")
    config = _config(tmp_path, rsync_path, _ping_toml(ping_server.url("/hang"), timeout="1s"))
    with caplog.at_level(logging.ERROR, logger="agent"):
        outcome, seconds = _run(config, source, tmp_path / "repo")
    assert outcome.snapshot is not None
    # /start runs beside the cycle; the final ping waits 1 s at most (the server would hang 30 s).
    assert seconds < baseline + 1 + 1.5, (seconds, baseline)
    failed = [r.getMessage() for r in caplog.records if "ping" in r.getMessage()]
    assert any("the success ping to http://127.0.0.1:" in line and "timed out" in line for line in failed), failed
    assert all("/hang" not in line for line in failed)  # the check's path (its secret) is not logged


# -- check-stale --------------------------------------------------------------------------------


@pytest.mark.integration
def test_check_stale_against_a_real_repository(
    tmp_path: Path, rsync_path: str, source: Path, ping_server: PingServer, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, rsync_path, _ping_toml(ping_server.url("/check")))
    state = tmp_path / "state"
    assert cli.main(["--config", config, "check-stale"]) == EXIT_OK  # no record yet: watching from now
    first = stale.read_record(str(state))
    assert first is not None and first.snapshot is None
    assert cli.main(["--config", config, "backup", "--quiet", str(source), str(tmp_path / "repo")]) == EXIT_OK
    record = stale.read_record(str(state))
    assert record is not None and record.snapshot is not None
    assert os.path.isdir(tmp_path / "repo" / "snapshots" / record.snapshot)
    assert cli.main(["--config", config, "check-stale"]) == EXIT_OK
    assert [p for p, _ in ping_server.pings] == ["/check/start", "/check"]
    # Eight days pass without a success (remind_after is 7 by default).
    old = stale.Record(record.time - dt.timedelta(days=8), record.snapshot, record.repository)
    stale.write_record(str(state), old)
    capsys.readouterr()
    assert cli.main(["--config", config, "check-stale"]) == EXIT_STALE
    path, body = ping_server.pings[-1]
    assert path == "/check/fail" and f"has succeeded for 8 days: the last was snapshot {record.snapshot}" in body
    assert "no backup of" in capsys.readouterr().err.lower()


def test_check_stale_needs_a_report_channel_and_a_readable_record(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[system]\nstate_dir = "{tmp_path / "state"}"\n')
    assert cli.main(["--config", str(config), "check-stale"]) == EXIT_USAGE
    assert "lists no [[report]] channel" in capsys.readouterr().err
    config.write_text(config.read_text() + _ping_toml("http://127.0.0.1:9/x"))
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / stale.RECORD).write_text("{not json")
    assert cli.main(["--config", str(config), "check-stale"]) == 5
    assert "not a record of backup-agent" in capsys.readouterr().err


# -- pure parts -----------------------------------------------------------------------------------


def test_the_verdict_is_the_last_word_of_the_run() -> None:
    made = complete("2026-12-05T08-00-00", statistics={"files": 3, "transferred_files": 1, "transferred_size": 2048})
    success = reports.verdict([step("lock", "start"), made], None, "h")
    assert success is not None and success.when == "success" and "files: 3, changed: 1 (2.0 KiB)" in success.text
    # The disk failed to unmount after the snapshot was complete: a failure that names the step.
    late = reports.verdict([made, error("unmount", "the disk is busy: close the files", 9, True)], None, "h")
    assert late is not None and late.when == "failure" and "FAILED at the unmount step" in late.subject
    assert "The snapshot was made before the failure:" in late.text
    assert reports.verdict([complete(None, skipped="disk not attached")], None, "h") is None
    assert reports.verdict([complete("x", dry_run=True)], None, "h") is None
    assert reports.verdict([], None, "h") is None
    crashed = reports.verdict([step("transfer", "start")], RuntimeError("boom"), "h")
    assert crashed is not None and crashed.when == "failure" and "RuntimeError: boom" in crashed.text
    partial = reports.verdict([warning("transfer", "3 files vanished"), complete("x", partial=True)], None, "h")
    assert partial is not None and partial.when == "failure" and "warning (transfer): 3 files vanished" in partial.text
    assert stale.made_snapshot([complete("x", partial=True)]) == "x"
    assert stale.made_snapshot([complete("x"), error("unmount", "busy", 9, True)]) is None


def test_the_log_tail_is_cut_from_the_front() -> None:
    text = reports.with_tail("result", [f"line {n}" for n in range(2000)])
    assert len(text.encode()) <= reports.MAX_BODY and text.endswith("line 1999\n") and text.startswith("…")
    assert reports.with_tail("result", []) == "result\n"


def test_ping_urls_follow_the_healthchecks_convention() -> None:
    report = PingReport(url="https://hc-ping.com/abc")
    assert [reports.ping_url(report, w) for w in ("start", "success", "failure", "stale")] == [
        "https://hc-ping.com/abc/start", "https://hc-ping.com/abc", "https://hc-ping.com/abc/fail", "https://hc-ping.com/abc/fail",
    ]  # fmt: skip


def test_stale_after_remind_after_days() -> None:
    now = dt.datetime(2026, 12, 5, 8, 0, tzinfo=dt.timezone.utc)
    record = stale.Record(now - dt.timedelta(days=7), "2026-11-28T08-00-00", "/srv/backup")
    found = stale.stale_verdict(record, now, 7, "h")
    assert found is not None and found.when == "stale" and found.subject == "backup-agent on h: no backup for 7 days"
    assert stale.stale_verdict(record, now - dt.timedelta(seconds=1), 7, "h") is None
    assert stale.stale_verdict(record, now, 0, "h") is None
    watching = stale.stale_verdict(stale.Record(now - dt.timedelta(days=9)), now, 7, "h")
    assert watching is not None and "since the check began watching, 9 days ago" in watching.text


def test_the_record_round_trips(tmp_path: Path) -> None:
    record = stale.Record(dt.datetime(2026, 12, 5, 8, 0, tzinfo=dt.timezone.utc), "s", "/r")
    stale.write_record(str(tmp_path / "state"), record)
    assert stale.read_record(str(tmp_path / "state")) == record
    assert json.loads((tmp_path / "state" / stale.RECORD).read_text())["snapshot"] == "s"
    assert stale.read_record(str(tmp_path / "none")) is None


def test_a_password_file_others_may_read_is_refused(trusted_dir: Path) -> None:
    assert read_secret(str(_password(trusted_dir))) == PASSWORD
    with pytest.raises(Distrust, match=r"may be read by group or others \(mode 0640\)"):
        read_secret(str(_password(trusted_dir, mode=0o640)))


@pytest.fixture
def smtps_server(certificate: Path) -> Iterator[SmtpServer]:
    """aiosmtpd speaking TLS from the first byte (SMTPS), no login."""
    mailbox = Mailbox()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(certificate), str(certificate.with_name("key.pem")))
    port = free_port()
    controller = aiosmtpd_controller.Controller(mailbox, hostname="127.0.0.1", port=port, ssl_context=context)
    controller.start()
    try:
        yield SmtpServer(port, mailbox, certificate)
    finally:
        controller.stop()


@pytest.mark.integration
def test_mail_over_tls_from_the_first_byte_without_a_login(smtps_server: SmtpServer) -> None:
    report = MailReport(
        host="127.0.0.1", sender="b@example.org", to=("a@example.org", "c@example.org"), port=smtps_server.port,
        security="tls", ca_file=str(smtps_server.certificate), on=("stale",), timeout=5,
    )  # fmt: skip
    record = stale.Record(dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=10), "s", "/r")
    found = stale.stale_verdict(record, dt.datetime.now(dt.timezone.utc), 7, "testhost")
    assert found is not None and reports.deliver(report, found, ["lock: start"])
    (mail,) = smtps_server.mailbox.messages
    assert mail["To"] == "a@example.org, c@example.org" and mail["Subject"] == "backup-agent on testhost: no backup for 10 days"
    assert mail["Auto-Submitted"] == "auto-generated" and "lock: start" in mail.get_content()


@pytest.mark.skipif(os.geteuid() != 0, reason="the CA file is checked for root only")
def test_a_ca_file_others_could_change_is_refused_as_root(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ca = tmp_path / "ca.pem"  # under /tmp, which anyone may write
    ca.write_text("")
    report = MailReport(host="127.0.0.1", sender="a@b", to=("c@d",), port=9, ca_file=str(ca), on=("success",), timeout=1)
    found = reports.verdict([complete("x")], None, "h")
    assert found is not None
    with caplog.at_level(logging.ERROR, logger="agent"):
        assert not reports.deliver(report, found)
    assert "refusing a file others could have changed or may read: /tmp is writable by group or others" in caplog.text


def test_a_result_not_in_on_is_not_sent() -> None:
    """Nothing is sent (port 9 on 127.0.0.1 would refuse it anyway, which would be logged)."""
    found = reports.verdict([complete("x")], None, "h")
    assert found is not None and found.when == "success"
    assert not reports.deliver(PingReport(url="http://127.0.0.1:9/c", on=("failure", "stale")), found)
    assert not reports.deliver(MailReport(host="127.0.0.1", sender="a@b", to=("c@d",), port=9), found)


@dataclass
class FailsAtTheEnd:
    heard: int = 0

    def send(self, event: Any) -> None:
        self.heard += 1

    def finish(self, problem: BaseException | None, tail: Any) -> None:
        raise RuntimeError("cannot report")


@pytest.mark.integration
def test_a_channel_that_fails_at_the_end_costs_the_backup_nothing(
    tmp_path: Path, rsync_path: str, source: Path, ping_server: PingServer, caplog: pytest.LogCaptureFixture
) -> None:
    settings = load_settings(_config(tmp_path, rsync_path, _ping_toml(ping_server.url("/check"))))
    request = Request(settings=settings, source=str(source), repository=str(tmp_path / "repo"))
    broken = FailsAtTheEnd()
    with caplog.at_level(logging.ERROR, logger="agent"):
        with channels.reporting([broken, *channels.backup_channels(None, settings, host="h", repository=str(tmp_path / "repo"))]) as emitter:
            outcome = Cycle(request, emitter, Runner()).run()
    assert outcome.snapshot is not None and broken.heard > 0
    assert [p for p, _ in ping_server.pings] == ["/check/start", "/check"]  # the channels after it still reported
    assert any("FailsAtTheEnd failed at the end of the run" in r.getMessage() for r in caplog.records)


def test_check_stale_with_remind_after_zero_never_reports(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[notifications]\nremind_after = 0\n[system]\nstate_dir = "{tmp_path}"\n' + _ping_toml("http://127.0.0.1:9/x"))
    stale.write_record(str(tmp_path), stale.Record(dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc), "s", "/r"))
    assert cli.main(["--config", str(config), "check-stale"]) == EXIT_OK


@pytest.mark.integration
def test_a_dry_run_reports_nothing(tmp_path: Path, rsync_path: str, source: Path, ping_server: PingServer) -> None:
    config = _config(tmp_path, rsync_path, _ping_toml(ping_server.url("/check")))
    assert cli.main(["--config", config, "backup", "--quiet", "--dry-run", str(source), str(tmp_path / "repo")]) == EXIT_OK
    assert ping_server.pings == [] and not (tmp_path / "state").exists()
    assert cli.main(["--config", config, "backup", "--quiet", str(source), str(tmp_path / "repo")]) == EXIT_OK
    assert [p for p, _ in ping_server.pings] == ["/check/start", "/check"]  # the same run for real is reported
