"""Several sources in one snapshot: which sources a backup reads, where each is stored, and how to read them back.

A snapshot of one source is that source's tree, as it always was. With
several (``[[source]]``), each source's tree is stored under its own
directory at the top of the snapshot (named by :mod:`agent.config.source_names`),
so ``/``, ``/boot/efi`` and ``/srv/data`` are one dated snapshot. The cycle
opens every source first (frozen ones are snapshotted then, close together),
then runs one transfer per source into its directory, each linking to the
same directory of the snapshots it shares with. A source that lies inside
another is kept out of the outer one (its directory stays, empty), so
nothing is stored twice.

The metadata's ``sources`` lists each source with its ``path``, its
``directory`` (``""`` for a snapshot of one source) and what the source
records of itself (excludes, skipped mounts, whether it was frozen). The
reading commands map a live path to the source with the longest path that
holds it (docs/ARCHITECTURE.md, "Sources").
"""

from __future__ import annotations

import os
import posixpath
import re
import stat
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from agent.config.model import DEFAULT_SYSTEM_EXCLUDES, Settings, SourceSpec
from agent.config.source_names import directory_problem
from agent.core.commands import Runner
from agent.engine.frozen import FrozenSource
from agent.engine.sources import PathSource, Source


@dataclass(frozen=True)
class Part:
    """One source of a snapshot and where it goes: ``directory`` ``""`` is the whole snapshot (one source)."""

    directory: str
    source: Source
    filter_rules: tuple[str, ...] = ()  # the sources inside this one, kept out of it


def below(outer: str, path: str) -> str | None:
    """``path`` relative to ``outer`` ("" for itself), None when outside it (pure)."""
    outer, path = posixpath.normpath(outer), posixpath.normpath(path)
    if path == outer:
        return ""
    prefix = outer.rstrip("/") + "/"
    return path[len(prefix) :] if path.startswith(prefix) else None


_WILDCARD = re.compile(r"([*?\[\\])")


def nested_filter_rules(path: str, others: Sequence[str]) -> tuple[str, ...]:
    """Excludes that keep the contents of the other sources inside ``path`` out of its transfer (pure)."""
    rules = []
    for other in sorted(others):
        rel = below(path, other)
        if rel:
            escaped = _WILDCARD.sub(r"\\\1", rel)
            rules.append(f"--exclude=/{escaped}/*")
    return tuple(rules)


def spec_excludes(spec: SourceSpec) -> tuple[str, ...]:
    """A ``[[source]]``'s excludes: its own, else the system's defaults for ``/``."""
    if spec.exclude is not None:
        return spec.exclude
    return DEFAULT_SYSTEM_EXCLUDES if spec.path == "/" else ()


def parts_from_settings(
    settings: Settings, path: str, runner: Runner, warn: Callable[[str], None]
) -> tuple[Part, ...]:
    """What the configuration backs up: ``[[source]]`` when given, else the one source at ``path``."""
    commands = settings.commands

    def frozen(live: PathSource, freeze: str) -> Source:
        # Also with "never": the metadata then says frozen: false for it, as for any source read live.
        return FrozenSource(
            live=live, runner=runner, freeze=freeze, btrfs=commands.btrfs, unshare=commands.unshare, warn=warn
        )

    if not settings.sources:
        return (Part("", frozen(PathSource.from_settings(settings, path), settings.freeze)),)
    parts = []
    paths = [spec.path for spec in settings.sources]
    for spec in settings.sources:
        live = PathSource(
            path=spec.path,
            excludes=spec_excludes(spec),
            one_file_system=settings.one_file_system if spec.one_file_system is None else spec.one_file_system,
            skip_cachedir_tagged=settings.skip_cachedir_tagged
            if spec.skip_cachedir_tagged is None else spec.skip_cachedir_tagged,
        )
        if len(settings.sources) == 1:
            return (Part("", frozen(live, spec.freeze)),)
        parts.append(Part(spec.directory, frozen(live, spec.freeze), nested_filter_rules(spec.path, paths)))
    return tuple(parts)


def part_link_dests(
    link_dests: Sequence[str], directory: str, path: str, metadata_of: Callable[[str], Mapping[str, Any]]
) -> list[str]:
    """The directories one source's transfer links to, in each snapshot it shares with: where that
    snapshot holds the same source path (its directory among several, or its whole tree when it holds
    that source alone), so unchanged files stay links when sources are added or removed; else the same
    directory (or tree) as today. Only real directories: a snapshot may not hold the source at all."""
    found = []
    path = posixpath.normpath(path)
    for link_dest in link_dests:
        metadata = metadata_of(link_dest)
        parts = stored_parts(metadata)
        source = metadata.get("source")
        if parts:
            where = dict(parts).get(path)
            if where is None:
                continue
            candidate = os.path.join(link_dest, where)
        elif isinstance(source, str) and posixpath.normpath(source) == path:
            candidate = link_dest
        else:
            candidate = os.path.join(link_dest, directory) if directory else link_dest
        if candidate == link_dest and not directory:
            found.append(candidate)  # as a snapshot of one source always linked
            continue
        try:
            if stat.S_ISDIR(os.lstat(candidate).st_mode):
                found.append(candidate)
        except OSError:
            continue
    return found


def sum_statistics(each: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The statistics of several transfers as one: every count added (pure)."""
    total: dict[str, Any] = {}
    for stats in each:
        for key, value in stats.items():
            if isinstance(value, int):
                total[key] = total.get(key, 0) + value
    return total


def stored_parts(metadata: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """``(live path, directory)`` of each source a snapshot of several holds; ``()`` for one source.

    Read from a removable disk: anything malformed reads as one source.
    """
    sources = metadata.get("sources")
    if not isinstance(sources, list) or len(sources) < 2:
        return ()
    parts = []
    for item in sources:
        if not isinstance(item, Mapping):
            return ()
        path, directory = item.get("path"), item.get("directory")
        if not isinstance(path, str) or not path.startswith("/") or not isinstance(directory, str):
            return ()
        if directory_problem(directory) is not None:
            return ()
        parts.append((posixpath.normpath(path), directory))
    return tuple(parts)


def covering(parts: Sequence[tuple[str, str]], path: str) -> tuple[str, str] | None:
    """The part whose source holds ``path``: the longest source path above it (pure)."""
    best: tuple[str, str] | None = None
    for source, directory in parts:
        if below(source, path) is not None and (best is None or len(source) > len(best[0])):
            best = (source, directory)
    return best
