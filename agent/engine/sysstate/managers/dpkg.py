"""dpkg and apt (Debian, Ubuntu): the selections, the manual set and /var/lib/dpkg."""

from __future__ import annotations

from agent.engine.sysstate.managers import Manager, Output, Texts, table, wrapped

INSTALLED = "installed.tsv"
MANUAL = "manual.txt"
SELECTIONS = "selections.txt"


def installed(texts: Texts) -> dict[str, str]:
    """name → version of the packages dpkg has (not only their configuration) installed."""
    found = {}
    for fields in table(texts.get(INSTALLED, ""), 3, separator="\t"):
        name, version, status = fields[0], fields[1], fields[2]
        # db:Status-Abbrev: the second letter is the state; n (not installed) and c (configuration only) are not packages on the system.
        if len(status) >= 2 and status[1] not in "nc":
            found[name] = version
    return found


def manual(texts: Texts) -> tuple[str, ...]:
    """apt's manual set (apt-mark showmanual); without apt, every package selected for install."""
    if MANUAL in texts:
        return tuple(sorted({line.strip() for line in texts[MANUAL].splitlines() if line.strip()}))
    return tuple(sorted(f[0] for f in table(texts.get(SELECTIONS, ""), 2) if f[1] == "install"))


def reinstall(texts: Texts) -> tuple[str, ...]:
    """apt-get installs the manual set; apt marks what it pulls in as automatic, as it was."""
    return ("apt-get update", *wrapped("apt-get install", list(manual(texts))))


MANAGER = Manager(
    name="dpkg",
    program="/usr/bin/dpkg",
    # status changes with every install and removal; extended_states with every apt-mark.
    database=("/var/lib/dpkg/status", "/var/lib/apt/extended_states"),
    outputs=(
        Output(SELECTIONS, ("/usr/bin/dpkg", "--get-selections")),
        Output(INSTALLED, ("/usr/bin/dpkg-query", "--show", "--showformat=${binary:Package}\t${Version}\t${db:Status-Abbrev}\n")),
        Output(MANUAL, ("/usr/bin/apt-mark", "showmanual"), optional=True),
    ),
    installed=installed,
    manual=manual,
    reinstall=reinstall,
    archive="/var/lib/dpkg",
    # Derivable or transient: the available file (apt's lists make it), dpkg's own backups
    # of its files (*-old), locks, and what an interrupted dpkg run left.
    archive_skip=("available", "available-old", "*-old", "lock", "lock-frontend", "triggers/Lock", "tmp.ci", "parts", "reassemble.deb"),
)
