"""The repository on the backup disk: its layout, manifests and unfinished transfers."""
