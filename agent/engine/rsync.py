"""rsync: argv building, progress and statistics parsing, exit-code meaning.

Everything here is pure: values in, values out, no I/O. The cycle runs the
argv from :func:`build_argv` through :class:`agent.core.commands.Runner` with
:data:`EXIT_TABLE`, feeds stdout lines to :class:`ProgressParser` (and keeps
them for :func:`parse_stats`) and stderr lines to :class:`ErrorCollector`.

Observed with rsync 3.5.0 (protocol 32), run with the flags of
:func:`build_argv`:

* ``--info=progress2`` writes one progress record per update, each starting
  with ``\\r`` and none ending in ``\\n``: an update inside a large file looks
  like ``\\r        1081344  21% 1000.98kB/s    0:00:03  `` (the time is the
  estimated time left), an update at the end of a file like
  ``\\r        3000000  60%    1.01MB/s    0:00:02 (xfr#1, to-chk=1/3)`` (the
  time is the time elapsed since the transfer started and the rate the
  average since then). ``ir-chk`` instead of ``to-chk`` means the file list
  is still being built (incremental recursion): the total still grows.
* rsync flushes after every progress record, so records arrive about once a
  second also when stdout is a pipe; no ``--outbuf`` option is needed.
* ``--no-human-readable`` prints byte counts without thousands separators
  (``3000000`` rather than ``3,000,000``); the rate keeps its ``kB/s``,
  ``MB/s``, ``GB/s`` unit (powers of 1024) and two decimals.
* ``--stats`` is the same as ``--info=stats2``: the block of
  ``Number of files: ...`` lines at the end of stdout.
* ``--itemize-changes`` writes ``%i %n%L``: eleven characters of flags, a
  space and the name, as ``>f+++++++++ a/b`` when a file starts to be
  received (before its progress records), ``cd+++++++++ a/`` for a new
  directory, ``*deleting   a/c``; a file hard-linked from a ``--link-dest``
  gets no line, so a backup where nothing changed prints none.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import asdict, dataclass
from typing import Final, Iterable, Sequence

from agent.core.commands import ExitTable
from agent.config.validate import check_exclude

# --- exit statuses ---------------------------------------------------------

# From "EXIT VALUES" in man rsync (3.5.0); 6 is RERR_LOG_FAILURE in errcode.h.
EXIT_TABLE: ExitTable = {
    0: ("ok", "success"),
    1: ("error", "syntax or usage error in rsync's command line"),
    2: ("error", "protocol incompatibility between the two rsync programs"),
    3: ("error", "error selecting the input or output files or directories"),
    4: ("error", "requested action not supported by this rsync"),
    5: ("error", "error starting the client-server protocol"),
    6: ("error", "the rsync daemon could not write to its log file"),
    10: ("error", "error in socket I/O"),
    11: ("error", "error in file I/O while reading the source or writing the snapshot"),
    12: ("error", "error in the rsync protocol data stream (the other side stopped or failed)"),
    13: ("error", "error with rsync's diagnostic messages"),
    14: ("error", "error in rsync's inter-process communication"),
    15: ("error", "an rsync sibling process crashed"),
    16: ("error", "an rsync sibling process was killed by a signal"),
    19: ("error", "rsync received SIGUSR1"),
    20: ("error", "rsync received SIGINT, SIGTERM or SIGHUP"),
    21: ("error", "waitpid() returned an error inside rsync"),
    22: ("error", "rsync could not allocate memory"),
    23: ("partial", "some files could not be transferred"),
    24: ("warning", "some source files vanished during the transfer"),
    25: ("error", "the --max-delete limit stopped deletions"),
    30: ("error", "timeout while sending or receiving data"),
    35: ("error", "timeout waiting for the rsync daemon connection"),
}

# --- argv ------------------------------------------------------------------

MAX_LINK_DESTS = 20  # rsync's MAX_BASIS_DIRS

BASE_OPTIONS: tuple[str, ...] = (
    "--archive",
    "--hard-links",
    "--acls",
    "--xattrs",
    "--numeric-ids",
)

# Parseable output: progress records, one itemized line per item rsync
# changes, and the statistics block on stdout, and numbers without thousands
# separators (whatever the locale). The itemized lines name the file being
# copied (ProgressParser.item) and, in the btrfs layout, every file written,
# so that the manifest knows what changed in the clone without a stat per
# file (Written). A file hard-linked from a --link-dest is not itemized: a
# backup where nothing changed prints none.
OUTPUT_OPTIONS: tuple[str, ...] = (
    "--info=progress2",
    "--itemize-changes",
    "--stats",
    "--no-human-readable",
)

# Updating a clone of the previous snapshot (the btrfs layout).
INPLACE_OPTIONS: tuple[str, ...] = ("--inplace", "--no-whole-file", "--delete", "--delete-excluded")

_FILTER_PREFIXES = ("--include=", "--exclude=", "--filter=")


def _check_absolute(what: str, path: str) -> None:
    if not path.startswith("/"):
        raise ValueError(f"{what} must be an absolute path, not {path!r}")


def _with_slash(path: str) -> str:
    return path if path.endswith("/") else path + "/"


def build_argv(
    *,
    rsync: str,
    source: str,
    target: str,
    link_dests: Sequence[str],
    one_file_system: bool,
    excludes: Sequence[str],
    filter_rules: Sequence[str] = (),
    io_timeout: int = 0,
    dry_run: bool = False,
    priority_prefix: Sequence[str] = (),
    inplace: bool = False,
) -> tuple[str, ...]:
    """The argv that copies ``source`` into ``target`` (pure).

    ``inplace``: ``target`` already holds the previous tree (a writable btrfs
    clone, agent.engine.btrfs): rsync writes only the changed blocks of a
    changed file into its own inode (``--inplace --no-whole-file``) and
    deletes what the source no longer has or now excludes, so the target
    ends as a copy of the source, as a fresh directory would.

    ``filter_rules`` are whole argv elements (``--include=...``,
    ``--exclude=...`` or ``--filter=...``, e.g. from
    :func:`cachedir_filter_rules` and :func:`exclude_repository_rule`) and come
    before the user's ``excludes``, so they win (rsync uses the first
    matching rule).
    """
    if not rsync:
        raise ValueError("the rsync program must not be empty")
    _check_absolute("source", source)
    _check_absolute("target", target)
    if len(link_dests) > MAX_LINK_DESTS:
        raise ValueError(f"rsync accepts at most {MAX_LINK_DESTS} --link-dest directories, got {len(link_dests)}")
    for link_dest in link_dests:
        _check_absolute("a --link-dest directory", link_dest)
    if io_timeout < 0:
        raise ValueError(f"io_timeout must be 0 (none) or a number of seconds, not {io_timeout}")
    for rule in filter_rules:
        if not rule.startswith(_FILTER_PREFIXES):
            raise ValueError(f"filter rule {rule!r} must start with one of {', '.join(_FILTER_PREFIXES)}")
    for pattern in excludes:
        check_exclude(pattern)

    argv: list[str] = [*priority_prefix, rsync, *BASE_OPTIONS]
    if one_file_system:
        argv.append("--one-file-system")
    argv.extend(OUTPUT_OPTIONS)
    argv.extend(f"--link-dest={link_dest}" for link_dest in link_dests)
    if inplace:
        if link_dests:
            raise ValueError("--inplace updates the previous tree itself: it takes no --link-dest")
        argv.extend(INPLACE_OPTIONS)
    if io_timeout > 0:
        argv.append(f"--timeout={io_timeout}")
    if dry_run:
        argv.append("--dry-run")
    argv.extend(filter_rules)
    argv.extend(f"--exclude={pattern}" for pattern in excludes)
    argv.append(_with_slash(source))
    argv.append(_with_slash(target))
    return tuple(argv)


def over_ssh(argv: Sequence[str], *, shell: str, host: str, link_dests: Sequence[str] = ()) -> tuple[str, ...]:
    """:func:`build_argv`'s argv sent to a server over ssh (pure).

    rsync starts ``shell`` (ssh with its options, one string) and writes
    into ``host:`` followed by the target, a path on the server.
    ``link_dests`` are relative to the target, as rsync resolves them on the
    receiving side: ``../<snapshot>`` (docs/ARCHITECTURE.md, "Remote
    repositories"), so neither the repository's path nor its name ever
    reaches them.
    """
    if len(argv) < 3:
        raise ValueError("an rsync argv ends with its source and target")
    for link_dest in link_dests:
        name = link_dest[3:]
        if not link_dest.startswith("../") or not name or "/" in name or name in (".", ".."):
            raise ValueError(f"a remote --link-dest is ../<entry of snapshots/>, not {link_dest!r}")
    if len(link_dests) + sum(1 for a in argv if a.startswith("--link-dest=")) > MAX_LINK_DESTS:
        raise ValueError(f"rsync accepts at most {MAX_LINK_DESTS} --link-dest directories")
    if not host or host.startswith("-") or any(c in host for c in "/: \n") and not host.startswith("["):
        raise ValueError(f"not a host name: {host!r}")
    *head, source, target = argv
    return (*head, "-e", shell, *(f"--link-dest={d}" for d in link_dests), source, f"{host}:{target}")


def to_daemon(argv: Sequence[str], *, url: str, options: Sequence[str], link_dests: Sequence[str] = ()) -> tuple[str, ...]:
    """:func:`build_argv`'s argv sent to an rsync daemon's module (pure): the target becomes ``url``
    (``rsync://[user@]host[:port]/module/...``), ``options`` (``--password-file``, ``--contimeout``) are added,
    and the link-dests are relative to the target as for :func:`over_ssh`."""
    checked = over_ssh(argv, shell="-", host="placeholder", link_dests=link_dests)
    if not url.startswith("rsync://"):
        raise ValueError(f"not an rsync daemon URL: {url!r}")
    *head, source, _target = checked
    shell_at = head.index("-e")
    head = head[:shell_at] + head[shell_at + 2 :]
    return (*head, *options, source, url)


# --- progress --------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    """One ``--info=progress2`` record.

    ``bytes``: bytes transferred so far (files hard-linked through
    --link-dest count as 0); ``percent``: of the total size of the files
    known so far; ``rate``: bytes per second; ``eta``: seconds left, None
    when unknown; ``files``: files transferred so far (``xfr#``);
    ``checked``/``total``: files checked so far and files in the list
    (``to-chk``/``ir-chk``), None before the first file ends; ``scanning``:
    the file list is still being built (``ir-chk``), so ``total`` and
    ``percent`` still move; ``current``: the last file rsync started to
    copy, as its itemized line names it (relative to the transfer's root,
    with rsync's escapes: :func:`readable_name`), None before the first.
    """

    bytes: int
    percent: int
    rate: float
    eta: int | None
    files: int
    checked: int | None
    total: int | None
    scanning: bool = False
    current: str | None = None


_PROGRESS_RE = re.compile(
    r"""^\s*
    (?P<bytes>\d{1,3}(?:[,.']\d{3})+|\d+)\s+
    (?P<percent>\d{1,3})%\s+
    (?P<rate>\d+(?:[.,]\d+)?)(?P<unit>[kKMGT])B/s\s+
    (?:(?P<h>\d+):(?P<m>\d\d):(?P<s>\d\d)|\?\?:\?\?:\?\?)
    (?:\s+\((?:xfr|xfer)\#(?P<xfr>\d+),\s*(?P<kind>to|ir)-(?:chk|check)=(?P<left>\d+)/(?P<total>\d+)\))?
    \s*$""",
    re.VERBOSE,
)

_RATE_UNITS = {"k": 1024.0, "K": 1024.0, "M": 1024.0**2, "G": 1024.0**3, "T": 1024.0**4}


def _parse_int(text: str) -> int:
    """An integer with or without thousands separators (',', '.', "'")."""
    return int(re.sub(r"[,.']", "", text))


class ProgressParser:
    """Turns rsync's progress2 lines into :class:`Progress` values.

    Records inside a file carry no file counts: the parser repeats the last
    ones it saw. rsync's position in the file list jumps out of order now and
    then, in both directions (3.5.0 with --hard-links printed ``to-chk=201/205``
    after ``to-chk=1/205`` near the end, and ``to-chk=12/32`` between
    ``26/32`` and ``25/32`` near the start): ``checked`` is the median of the
    last three positions (one out-of-order record is dropped, at the cost of
    showing the position one record late), never goes back while the total
    stays, and is the total once rsync says nothing is left to check. On records that end a file rsync prints the time elapsed,
    not the time left: there ``eta`` is estimated from the elapsed time and
    the percent, like rsync's own estimate from bytes (None while the list is
    still growing or nothing is done yet). Both are bytes-based: with
    --link-dest most files are linked, not sent, and count for nothing in
    ``bytes`` and ``percent``; ``checked``/``total`` then tells the progress.
    """

    def __init__(self) -> None:
        self._files = 0
        self._checked: int | None = None
        self._recent: tuple[int, ...] = ()  # the last three positions rsync printed
        self._total: int | None = None
        self._scanning = False
        self._current: str | None = None

    def item(self, line: str) -> bool:
        """Take ``line`` when it is an ``--itemize-changes`` line (True); else leave it to the caller.

        A regular file sent (``>f``, or ``<f`` to a server) becomes the
        current file of the next records. rsync prints such a line as it
        starts the file, before the file's own progress records. Called for
        every line rsync prints, so it only slices the line: the eleven
        flags, a space, the name (``*deleting  `` is eleven characters too).
        """
        if len(line) < 13 or line[11] != " " or line[0] not in "<>ch.*":
            return False
        if line[1] == "f" and line[0] in "<>":
            self._current = line[12:]
        return True

    def feed(self, line: str) -> Progress | None:
        match = _PROGRESS_RE.match(line)
        if match is None:
            return None
        percent = int(match["percent"])
        rate = float(match["rate"].replace(",", ".")) * _RATE_UNITS[match["unit"]]
        seconds = None
        if match["h"] is not None:
            seconds = int(match["h"]) * 3600 + int(match["m"]) * 60 + int(match["s"])
        if match["xfr"] is None:
            # rsync prints 0:00:00 when it has no rate yet: that is no estimate.
            eta = seconds if rate > 0 or percent == 100 else None
        else:
            self._files = int(match["xfr"])
            total = int(match["total"])
            left = int(match["left"])
            self._recent = (*self._recent[-2:], max(0, total - left))
            checked = total if left == 0 else _median_low(self._recent)
            if self._checked is not None and self._total is not None and total >= self._total:
                checked = min(max(checked, self._checked), total)
            self._checked, self._total = checked, total
            self._scanning = match["kind"] == "ir"
            eta = None
            if seconds is not None and not self._scanning and percent > 0:
                eta = round(seconds * (100 - percent) / percent)
        return Progress(
            bytes=_parse_int(match["bytes"]),
            percent=percent,
            rate=rate,
            eta=eta,
            files=self._files,
            checked=self._checked,
            total=self._total,
            scanning=self._scanning,
            current=self._current,
        )


def readable_name(name: str) -> str:
    """An itemized name as text to show: rsync's ``\\#ooo`` escapes back to bytes, read as UTF-8.

    Only for showing: a byte that is not UTF-8 becomes U+FFFD and a control character (a newline in a
    name) "?", so the name stays one line; :class:`Written` keeps the exact bytes.
    """
    if "\\#" not in name:
        return name
    raw = _ESCAPED_BYTE.sub(lambda m: bytes((int(m[1], 8),)), name.encode("utf-8", "surrogateescape"))
    return "".join(c if c.isprintable() else "?" for c in raw.decode("utf-8", "replace"))


def _median_low(values: tuple[int, ...]) -> int:
    """The median of one to three values; of two, the lower (nothing yet confirms the higher)."""
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


# --- statistics ------------------------------------------------------------


@dataclass(frozen=True)
class Stats:
    """The ``--stats`` block; every field is 0 when rsync did not print it."""

    files: int = 0
    regular_files: int = 0
    directories: int = 0
    created_files: int = 0
    transferred_files: int = 0
    total_size: int = 0
    transferred_size: int = 0
    literal_data: int = 0
    matched_data: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    deleted_files: int = 0
    file_list_size: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


_STATS_FIELDS = {
    "Number of files": "files",
    "Number of created files": "created_files",
    "Number of deleted files": "deleted_files",
    "Number of regular files transferred": "transferred_files",
    "Total file size": "total_size",
    "Total transferred file size": "transferred_size",
    "Literal data": "literal_data",
    "Matched data": "matched_data",
    "File list size": "file_list_size",
    "Total bytes sent": "bytes_sent",
    "Total bytes received": "bytes_received",
}
_NUMBER = r"\d{1,3}(?:[,.']\d{3})+|\d+"
_STATS_RE = re.compile(rf"^(?P<label>[A-Za-z ]+): (?P<value>{_NUMBER})(?: bytes)?(?: \((?P<detail>[^)]*)\))?\s*$")
_DETAIL_RE = re.compile(rf"(?P<key>[a-z]+): (?P<value>{_NUMBER})")


def parse_stats(lines: Iterable[str]) -> Stats:
    """The :class:`Stats` in rsync's output; other lines are ignored."""
    values: dict[str, int] = {}
    for line in lines:
        match = _STATS_RE.match(line.strip())
        if match is None or match["label"] not in _STATS_FIELDS:
            continue
        field = _STATS_FIELDS[match["label"]]
        values[field] = _parse_int(match["value"])
        if field == "files" and match["detail"]:
            detail = {m["key"]: _parse_int(m["value"]) for m in _DETAIL_RE.finditer(match["detail"])}
            values["regular_files"] = detail.get("reg", 0)
            values["directories"] = detail.get("dir", 0)
    return Stats(**values)


# --- itemized changes ------------------------------------------------------

# "<update type><f><9 flags> <name>" (--itemize-changes with -A -X); "*deleting" lines are not files written.
_ITEMIZED = re.compile(r"^[<>ch.]f[^ ]{9} (?P<name>.+)$")
_ESCAPED_BYTE = re.compile(rb"\\#([0-7]{3})")


class Written:
    """The regular files rsync wrote or changed, from its ``--itemize-changes`` lines on stdout.

    rsync (in the C locale the runner gives it) prints every byte that is
    not printable ASCII as ``\\#ooo``, a backslash before ``#`` included, so a
    name is read back exactly. A line that is not ASCII could not be: then
    ``exact`` turns false and the list must not be trusted.
    """

    def __init__(self) -> None:
        self.files: set[bytes] = set()
        self.exact = True

    def feed(self, line: str) -> bool:
        """Take ``line`` when it is an itemized regular file (True); else leave it to the caller."""
        match = _ITEMIZED.match(line)
        if match is None:
            return False
        if not line.isascii():
            self.exact = False
            return True
        name = match["name"].encode("ascii")
        self.files.add(_ESCAPED_BYTE.sub(lambda m: bytes((int(m[1], 8),)), name))
        return True


# --- stderr ----------------------------------------------------------------


class ErrorCollector:
    """Counts rsync's per-file problems on stderr.

    rsync 3.5.0 writes a per-file error as ``rsync: [sender] send_files failed
    to open "/x/y": Permission denied (13)`` and a vanished file as ``file has
    vanished: "/x/y"``. The last line, ``rsync error: ... (code 23) at
    main.c(1394) [sender=3.5.0]`` or ``rsync warning: ... (code 24) ...``, is
    the summary of the exit status (see :data:`EXIT_TABLE`), not a per-file
    error, and is not counted.

    ``count`` and ``first`` are the errors (vanished files not included);
    ``vanished`` counts the vanished files.
    """

    KEEP = 10

    def __init__(self) -> None:
        self.count = 0
        self.vanished = 0
        self._first: list[str] = []

    @property
    def first(self) -> tuple[str, ...]:
        return tuple(self._first)

    def feed(self, line: str) -> None:
        line = line.rstrip()
        body = line[len("rsync: ") :] if line.startswith("rsync: ") else line
        if body.startswith("file has vanished: "):
            self.vanished += 1
        elif line.startswith("rsync: "):
            self.count += 1
            if len(self._first) < self.KEEP:
                self._first.append(line)


# --- CACHEDIR.TAG and the repository ---------------------------------------

CACHEDIR_SIGNATURE = b"Signature: 8a477f597d28d172789f06886806bc55"
CACHEDIR_TAG = "CACHEDIR.TAG"

_WILDCARDS = "*?["


def is_cachedir_tag(first_bytes: bytes) -> bool:
    """True if a CACHEDIR.TAG starts with the signature (bford.info/cachedir)."""
    return first_bytes.startswith(CACHEDIR_SIGNATURE)


def _escape(text: str) -> str:
    """``text`` matched literally inside a pattern that has wildcards."""
    return re.sub(r"([*?\[\\])", r"\\\1", text)


def _literal(path: str) -> str:
    """A pattern that matches exactly ``path``.

    rsync reads a pattern without ``*?[`` literally (a backslash is then just
    a backslash), and one with any of them as a wildcard pattern in which a
    backslash escapes the next character.
    """
    return _escape(path) if any(char in path for char in _WILDCARDS) else path


def _relative(source: str, path: str) -> str | None:
    """``path`` relative to ``source`` ("" for the source itself), None outside it."""
    source = posixpath.normpath(source).rstrip("/") or "/"
    path = posixpath.normpath(path)
    source = "/" + source.lstrip("/")
    path = "/" + path.lstrip("/")
    if path == source:
        return ""
    prefix = source if source == "/" else source + "/"
    if not path.startswith(prefix):
        return None
    return path[len(prefix) :]


def cachedir_filter_rules(source: str, tagged_dirs: Iterable[str]) -> tuple[str, ...]:
    """Keep each tagged directory and its CACHEDIR.TAG, skip the rest of it.

    Like ``tar --exclude-caches``. The rules are anchored at the transfer
    root (``source``) and must come before the user's excludes.
    """
    _check_absolute("source", source)
    rules: list[str] = []
    for directory in tagged_dirs:
        _check_absolute("a tagged directory", directory)
        relative = _relative(source, directory)
        if relative is None:
            raise ValueError(f"{directory!r} is not inside the source {source!r}")
        anchored = f"/{relative}/" if relative else "/"
        rules.append(f"--include={_literal(anchored + CACHEDIR_TAG)}")
        rules.append(f"--exclude={_escape(anchored)}*")
    return tuple(rules)


def exclude_repository_rule(source: str, repository: str) -> tuple[str, ...]:
    """An anchored exclude for ``repository`` when it lies inside ``source``."""
    _check_absolute("source", source)
    _check_absolute("repository", repository)
    relative = _relative(source, repository)
    if relative is None:
        return ()
    if relative == "":
        raise ValueError(f"the repository {repository!r} is the source itself")
    return (f"--exclude={_literal('/' + relative)}",)


# What a restore through sudo leaves out: it hands files to the caller, who
# must not get root's powers with them (an old setuid-root program, or one
# with file capabilities).
HAND_OUT_OPTIONS: Final = ("--chmod=ug-s", "--filter=-x security.capability")


def restore_argv(
    *, rsync: str, source: str, destination: str, dry_run: bool = False, hand_out: bool = False
) -> tuple[str, ...]:
    """The argv that copies ``source`` out of a snapshot into ``destination`` with every attribute (pure).

    ``source`` is ``<snapshot>/<where>/./<path>``: with ``--relative`` rsync
    recreates ``<path>`` below ``destination``, its directories with the
    snapshot's owners, modes and times. Without a trailing slash a directory
    is copied as itself, and a symbolic link as a link. ``hand_out`` (through
    sudo): without setuid/setgid bits and file capabilities.
    """
    if not rsync:
        raise ValueError("the rsync program must not be empty")
    _check_absolute("source", source)
    _check_absolute("destination", destination)
    if "/./" not in source:
        raise ValueError(f"source {source!r} must mark where the restored path starts with /./")
    argv = [rsync, *BASE_OPTIONS, "--relative"]
    if hand_out:
        argv += HAND_OUT_OPTIONS
    if dry_run:
        argv.append("--dry-run")
    return (*argv, source.rstrip("/") if not source.endswith("/./") else source, _with_slash(destination))
