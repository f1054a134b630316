"""The keys of one ``[[offsite]]`` table, apart so the validators can list them without a cycle of imports."""

from __future__ import annotations

from typing import Final

OFFSITE_KEYS: Final[tuple[str, ...]] = (
    "name",
    "repository",
    "repository_file",
    "password_file",
    "password_command",
    "environment_file",
    "host",
    "interval",
    "metered",
    "remind_after",
    "rotation",
    "append_only",
    "prune_interval",
    "check_interval",
    "stall_timeout",
    "check_parts",
    "pack_size",
    "limit_upload",
    "options",
)
