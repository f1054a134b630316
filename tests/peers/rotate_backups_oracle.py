"""Oracle: the real rotate-backups' decision, one JSON line in, one out.

Run with the interpreter of a separate virtualenv that has rotate-backups
(never a dependency of backup-agent), e.g.::

    python3 -m venv .venv-peers && .venv-peers/bin/pip install rotate-backups
    echo '{"names": ["2026-11-22T13-00-00+0100"], "scheme": {"hourly": 24}}' \
        | .venv-peers/bin/python tests/peers/rotate_backups_oracle.py

Each input line is ``{"names": [...], "scheme": {"hourly": 24, ...},
"prefer_recent": bool, "strict": bool}`` (the last two default to
rotate-backups' defaults); each output line is ``{"keep": {name: [freqs]},
"delete": [names]}``, or ``{"error": "..."}`` if rotate-backups raised.
Names are treated as directory entries: ones without a timestamp or with an
impossible date are ignored, as collect_backups ignores them (they appear in
neither keep nor delete).
"""

import json
import sys
import traceback

from natsort import natsort
from rotate_backups import TIMESTAMP_PATTERN, Backup, RotateBackups


def collect(program, names):
    """The Backup objects collect_backups would build, in its order."""
    backups = []
    for name in natsort(names):
        match = TIMESTAMP_PATTERN.search(name)
        if match:
            try:
                backups.append(Backup(pathname=name, timestamp=program.match_to_datetime(match)))
            except ValueError:
                pass
    return sorted(backups)


def decide(request):
    """rotate-backups' keep/delete for one request."""
    program = RotateBackups(
        rotation_scheme=request["scheme"],
        prefer_recent=request.get("prefer_recent", False),
        strict=request.get("strict", True),
    )
    backups = collect(program, request["names"])
    if not backups:
        return {"keep": {}, "delete": []}
    by_frequency = program.group_backups(backups)
    program.apply_rotation_scheme(by_frequency, backups[-1].timestamp)
    preserved = program.find_preservation_criteria(by_frequency)
    return {
        "keep": {b.pathname: list(preserved[b]) for b in backups if b in preserved},
        "delete": [b.pathname for b in backups if b not in preserved],
    }


def main():
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            answer = decide(json.loads(line))
        except Exception as error:  # report it to the caller instead of dying mid-session
            answer = {"error": "".join(traceback.format_exception_only(type(error), error)).strip()}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
