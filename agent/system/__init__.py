"""Installing into the system: the sudo rule, the udev rule and the user unit."""
