"""The backup cycle and the commands that read snapshots back: rsync, hooks, verify, restore, history."""
