"""backup-agent: hard-linked rsync snapshots on an encrypted backup disk."""

__version__ = "0.1.0"
