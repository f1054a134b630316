"""The unprivileged desktop agent: its agenda, udev, reminders, state, and its D-Bus adapters."""
