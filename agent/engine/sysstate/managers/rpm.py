"""rpm (Fedora, RHEL, openSUSE): the installed packages, dnf's user-installed set and the rpm database."""

from __future__ import annotations

from agent.engine.sysstate.managers import Manager, Output, Texts, table, wrapped

INSTALLED = "installed.tsv"
MANUAL = "manual.txt"


def installed(texts: Texts) -> dict[str, str]:
    """name → epoch:version-release.arch."""
    return {fields[0]: fields[1] for fields in table(texts.get(INSTALLED, ""), 2, separator="\t")}


def manual(texts: Texts) -> tuple[str, ...]:
    """dnf's user-installed packages; without dnf, every installed package."""
    if MANUAL in texts:
        return tuple(sorted({line.strip() for line in texts[MANUAL].splitlines() if line.strip()}))
    return tuple(sorted(installed(texts)))


def reinstall(texts: Texts) -> tuple[str, ...]:
    return wrapped("dnf install", list(manual(texts)))


MANAGER = Manager(
    name="rpm",
    program="/usr/bin/rpm",
    database=("/var/lib/rpm/rpmdb.sqlite", "/var/lib/rpm/Packages", "/usr/lib/sysimage/rpm/rpmdb.sqlite"),
    outputs=(
        Output(INSTALLED, ("/usr/bin/rpm", "--query", "--all", "--queryformat", "%{NAME}\t%{EPOCHNUM}:%{VERSION}-%{RELEASE}.%{ARCH}\n")),
        Output(MANUAL, ("/usr/bin/dnf", "--cacheonly", "repoquery", "--userinstalled", "--queryformat", "%{name}\n"), optional=True),
    ),
    installed=installed,
    manual=manual,
    reinstall=reinstall,
    archive="/var/lib/rpm",
    # Berkeley DB's environment files and locks are rebuilt by rpm.
    archive_skip=("__db.*", ".rpm.lock", "*.lock"),
)
