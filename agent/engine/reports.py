"""Reports beyond the desktop: mail over SMTP and HTTP pings, for machines nobody watches.

Two report channels (docs/ARCHITECTURE.md, "Seams for what comes next",
"Channel") built from the ``[[report]]`` list of the system config. Each
keeps the events of the run and acts once the run has ended
(:meth:`finish`), after the disk is closed: an error while closing the disk
comes after the ``complete`` event, and the report must tell the result as
it finally is. The HTTP channel also pings ``/start`` when the backup proper
begins (the ``prepare`` step), in a thread of its own, so that a slow
endpoint never holds up the backup.

What the result is (:func:`verdict`) and what the report says are pure
functions of the events; sending is the only I/O. A channel that cannot send
logs one line (never the password) and the backup goes on.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Sequence

from agent.config.model import MailReport, PingReport, Report
from agent.config.trust import Distrust, read_secret, walk_trusted
from agent.core.events import CompleteEvent, ErrorEvent, Event, StepEvent, WarningEvent
from agent.engine.cycle import human_size

if TYPE_CHECKING:
    import smtplib
    from email.message import EmailMessage

log = logging.getLogger(__name__)

# What a ping body or a mail holds of the log at most (Healthchecks keeps 10 KB of a body by default).
MAX_BODY: Final = 10_000
TAIL_LINES: Final = 60


@dataclass(frozen=True)
class Verdict:
    """What one run (or a stale check) tells: ``when`` is one of the ``on`` words of ``[[report]]``."""

    when: str  # "failure" | "success" | "stale"
    subject: str
    text: str


class LogTail(logging.Handler):
    """The run's last lines, its events and what the program logged: the ``/fail`` body and the end of a mail."""

    def __init__(self, lines: int = TAIL_LINES) -> None:
        super().__init__(logging.INFO)
        self._lines: collections.deque[str] = collections.deque(maxlen=lines)

    def emit(self, record: logging.LogRecord) -> None:
        self._lines.append(f"{record.levelname.lower()}: {record.getMessage()}")

    def note(self, event: Event) -> None:
        """An event as a line, between the log's own lines: what the run did, in order."""
        if isinstance(event, StepEvent):
            self._lines.append(f"{event.step}: {event.state}")
        elif isinstance(event, WarningEvent):
            self._lines.append(f"warning ({event.step}): {event.message}")
        elif isinstance(event, ErrorEvent):
            self._lines.append(f"error ({event.step or '-'}): {event.message}")
        elif isinstance(event, CompleteEvent):
            self._lines.append(f"complete: snapshot {event.snapshot}" if event.skipped is None else f"complete: {event.skipped}")

    def lines(self) -> tuple[str, ...]:
        return tuple(self._lines)


def _statistics(done: CompleteEvent) -> list[str]:
    stats = done.statistics
    lines = [f"snapshot: {done.snapshot}"]
    if stats:
        lines.append(
            f"files: {int(stats.get('files', 0))}, changed: {int(stats.get('transferred_files', 0))} "
            f"({human_size(stats.get('transferred_size', 0))}), total size: {human_size(stats.get('total_size', 0))}"
        )
    if done.duration is not None:
        lines.append(f"duration: {done.duration:.1f} s")
    return lines


def verdict(events: Sequence[Event], problem: BaseException | None, host: str) -> Verdict | None:
    """The run's result from its events, or None when there is nothing to report (skipped, dry run, not run).

    Failure: an ``error`` event (the last word, also after ``complete``), or
    an exception that ended the run without one (``problem``), or a snapshot
    that is partial or flagged (it exists, but someone must look at it).
    """
    warnings = [f"warning ({e.step}): {e.message}" for e in events if isinstance(e, WarningEvent)]
    errors = [e for e in events if isinstance(e, ErrorEvent)]
    done = next((e for e in reversed(events) if isinstance(e, CompleteEvent)), None)
    if errors:
        last = errors[-1]
        where = f" at the {last.step} step" if last.step else ""
        untouched = "earlier snapshots are untouched" if last.snapshots_untouched else "snapshots were deleted before the failure"
        lines = [
            f"The backup of {host} failed{where} (exit status {last.exit_code}).",
            "",
            f"step: {last.step or '-'}",
            f"what happened and what to do: {last.message}",
            untouched,
        ]
        if done is not None and done.snapshot:
            lines += ["", "The snapshot was made before the failure:", *_statistics(done)]
        return Verdict("failure", f"backup-agent on {host}: backup FAILED{where}", "\n".join([*lines, *_listed(warnings)]))
    if done is None:
        if problem is None:
            return None
        text = f"The backup of {host} stopped unexpectedly: {type(problem).__name__}: {problem}"
        return Verdict("failure", f"backup-agent on {host}: backup FAILED", text)
    if done.skipped is not None or bool(done.detail.get("dry_run", False)) or done.snapshot is None:
        return None
    lines = [f"The backup of {host} made snapshot {done.snapshot}.", "", *_statistics(done)]
    if done.partial or done.flagged:
        why = "some files could not be read" if done.partial else f"flagged: {done.flagged}"
        lines[0] = f"The backup of {host} made snapshot {done.snapshot}, which needs a look: {why}."
        return Verdict("failure", f"backup-agent on {host}: snapshot {done.snapshot} needs a look", "\n".join([*lines, *_listed(warnings)]))
    return Verdict("success", f"backup-agent on {host}: snapshot {done.snapshot}", "\n".join([*lines, *_listed(warnings)]))


def _listed(warnings: list[str]) -> list[str]:
    return ["", *warnings] if warnings else []


def with_tail(text: str, tail: Sequence[str]) -> str:
    """The report's text and the log's last lines, cut from the front to :data:`MAX_BODY` bytes."""
    full = text + ("\n\nlog (last lines):\n" + "\n".join(tail) if tail else "") + "\n"
    raw = full.encode("utf-8")
    if len(raw) <= MAX_BODY:
        return full
    return "…" + raw[-(MAX_BODY - 3) :].decode("utf-8", errors="ignore")


# -- mail -------------------------------------------------------------------------------


def mail_message(report: MailReport, subject: str, text: str) -> EmailMessage:
    """The plain-text message (pure but for its date and id)."""
    from email.message import EmailMessage  # mail's modules only when a mail is sent: not in every backup's start-up
    from email.utils import formatdate, make_msgid

    message = EmailMessage()
    message["From"] = report.sender
    message["To"] = ", ".join(report.to)
    message["Subject"] = subject
    message["Date"] = formatdate(localtime=True)
    message["Message-ID"] = make_msgid(domain=report.sender.rpartition("@")[2] or None)
    message["Auto-Submitted"] = "auto-generated"
    message.set_content(text)
    return message


def send_mail(report: MailReport, subject: str, text: str) -> None:
    """One mail over SMTP (STARTTLS, TLS or plain), certificates checked; raises OSError, SMTPException or Distrust."""
    import smtplib
    import ssl

    if report.ca_file is not None and os.geteuid() == 0:
        walk_trusted(report.ca_file)  # whoever could change it could read the mail, and the password
    context = ssl.create_default_context(cafile=report.ca_file)
    password = read_secret(report.password_file) if report.password_file is not None else None
    smtp: smtplib.SMTP
    if report.security == "tls":
        smtp = smtplib.SMTP_SSL(report.host, report.port, timeout=report.timeout, context=context)
    else:
        smtp = smtplib.SMTP(report.host, report.port, timeout=report.timeout)
    with smtp:
        if report.security == "starttls":
            smtp.starttls(context=context)
        if report.user is not None and password is not None:
            _login(smtp, report.user, password)
        smtp.send_message(mail_message(report, subject, text))


def _login(smtp: smtplib.SMTP, user: str, password: str) -> None:
    """One login: AUTH PLAIN where offered (the common one, and inside TLS), else what smtplib picks.

    smtplib's ``login`` tries each mechanism in turn after a refusal, which
    only asks the same wrong password again: one clear answer is what the
    log needs, and a server may count each try against the account.
    """
    import smtplib

    smtp.ehlo_or_helo_if_needed()
    if "PLAIN" in smtp.esmtp_features.get("auth", "").upper().split():
        smtp.user, smtp.password = user, password
        code, reply = smtp.auth("PLAIN", smtp.auth_plain)
        if code != 235:
            raise smtplib.SMTPAuthenticationError(code, reply)
    else:
        smtp.login(user, password)


def _mail_failure(report: MailReport, exc: BaseException) -> str:
    """Why a mail was not sent, in words that never hold the password."""
    import smtplib
    import ssl

    if isinstance(exc, smtplib.SMTPAuthenticationError):
        reply = exc.smtp_error.decode("utf-8", "replace") if isinstance(exc.smtp_error, bytes) else str(exc.smtp_error)
        return f"the server refused the login of {report.user!r} ({exc.smtp_code} {reply}): check user and password_file"
    if isinstance(exc, Distrust):
        return f"refusing a file others could have changed or may read: {exc.problem}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed ({exc.reason or exc}): check security, port and ca_file"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return f"no answer within {report.timeout} s"
    return f"{type(exc).__name__}: {exc}"


class Mail:
    """A report channel: one mail when the run has ended, if its result is in ``on``."""

    def __init__(self, report: MailReport, host: str) -> None:
        self.report = report
        self.host = host
        self.events: list[Event] = []

    def send(self, event: Event) -> None:
        self.events.append(event)

    def finish(self, problem: BaseException | None, tail: Sequence[str]) -> None:
        found = verdict(self.events, problem, self.host)
        if found is not None:
            deliver(self.report, found, tail)


# -- HTTP pings ----------------------------------------------------------------------


def ping_url(report: PingReport, when: str) -> str:
    """The Healthchecks convention: ``/start``, the URL itself for success, ``/fail`` (stale is a failure)."""
    return {"start": report.url + "/start", "success": report.url}.get(when, report.url + "/fail")


def ping(report: PingReport, when: str, body: str) -> None:
    """One POST, no retry; raises OSError (URLError, a timeout) or ValueError for an answer that is not 2xx."""
    import urllib.request

    request = urllib.request.Request(
        ping_url(report, when),
        data=body.encode("utf-8"),
        method="POST",
        headers={"Content-Type": "text/plain; charset=utf-8", "User-Agent": "backup-agent"},
    )
    with urllib.request.urlopen(request, timeout=report.timeout) as answer:
        if not 200 <= answer.status < 300:
            raise ValueError(f"HTTP status {answer.status}")


def _ping_logged(report: PingReport, when: str, body: str) -> bool:
    import urllib.error

    try:
        ping(report, when, body)
    except (OSError, ValueError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        log.error("the %s ping to %s failed (%s); the backup goes on", when, _shown(report.url), reason)
        return False
    log.debug("sent the %s ping to %s", when, _shown(report.url))
    return True


def _shown(url: str) -> str:
    """A URL for the log without its path: the check's UUID is what lets anyone ping it."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}/…"


class Ping:
    """A report channel: ``/start`` when the backup proper begins, then success or ``/fail`` with the log tail.

    ``/start`` is sent only when ``success`` is in ``on`` (then the endpoint
    is a heartbeat that may time a run and notice one that never ends), from
    a daemon thread, so the backup never waits for it.
    """

    def __init__(self, report: PingReport, host: str) -> None:
        self.report = report
        self.host = host
        self.events: list[Event] = []
        self._start: threading.Thread | None = None

    def send(self, event: Event) -> None:
        self.events.append(event)
        begins = isinstance(event, StepEvent) and event.step == "prepare" and event.state == "start"
        if begins and self._start is None and "success" in self.report.on:
            self._start = threading.Thread(target=_ping_logged, args=(self.report, "start", ""), daemon=True)
            self._start.start()

    def finish(self, problem: BaseException | None, tail: Sequence[str]) -> None:
        found = verdict(self.events, problem, self.host)
        if self._start is not None:
            self._start.join(timeout=0.5)  # its answer first when it is about to come; never a long wait
        if found is not None:
            deliver(self.report, found, tail)


def deliver(report: Report, found: Verdict, tail: Sequence[str] = ()) -> bool:
    """Send ``found`` through one channel if it asks for it; a failure is one logged line. True when sent."""
    if found.when not in report.on:
        return False
    if isinstance(report, PingReport):
        return _ping_logged(report, found.when, with_tail(found.text, tail))
    import smtplib

    try:
        send_mail(report, found.subject, with_tail(found.text, tail))
    except (OSError, smtplib.SMTPException, Distrust, ValueError) as exc:
        log.error(
            "the %s mail to %s via %s:%d was not sent: %s; the backup goes on",
            found.when,
            ", ".join(report.to),
            report.host,
            report.port,
            _mail_failure(report, exc),
        )
        return False
    log.info("mailed the %s report to %s", found.when, ", ".join(report.to))
    return True


def channels_for(reports: Sequence[Report], host: str) -> tuple[Mail | Ping, ...]:
    """One channel per ``[[report]]``, in the file's order."""
    return tuple(Mail(r, host) if isinstance(r, MailReport) else Ping(r, host) for r in reports)
