"""The encrypted backup disk: find it, unlock it, mount it, prove it, and leave it as found.

Import from the module that does the job (``from agent.disk.unlock import
unlocked``); this package itself defines nothing.

- :mod:`agent.disk.tables`: crypttab and fstab read as the system's tools
  read them (pure).
- :mod:`agent.disk.find`: which configured disk is attached (``blkid`` by
  LUKS UUID), and which disk a command means.
- :mod:`agent.disk.unlock`: unlocking and locking the LUKS container, after
  checking its crypttab line and key file; the unlock method and argv (pure).
- :mod:`agent.disk.mount`: mounting and unmounting, never lazily, and who
  keeps a mount busy; the mount and umount argv (pure).
- :mod:`agent.disk.identity`: proving what is mounted is the backup disk
  and its repository the one this machine recorded; the recorded ids.
- :mod:`agent.disk.devices`: mount points and device numbers as mountinfo
  shows them, shared by the steps above.

Pure rules take values and return values and are tested directly; the
adapters run every external program through :class:`~agent.core.commands.Runner`
and check each step's result on the system itself (the mapped device exists,
mountinfo shows the mount, the mapped device is gone) instead of trusting an
exit status. "Leave it as found": each context manager undoes only what it
did itself. The caller enters ``unlocked``, then ``mounted``, on one
ExitStack, so the undo runs unmount first, lock last::

    with contextlib.ExitStack() as stack:
        stack.enter_context(unlocked(disk, settings, runner, warn))
        stack.enter_context(mounted(disk, settings, runner, warn))
        verify_identity(disk, settings)
        ...

A filesystem is never locked while it is mounted, and never unmounted
lazily: when the mount is busy it stays mounted and unlocked, and the error
says who holds it and how to finish by hand.
"""
