"""The ground floor: errors, the one command runner, typed events, files, locks, time parsing, mounts."""
