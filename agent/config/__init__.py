"""The configuration: one TOML file in, typed and validated settings out.

Import from the module that does the job (``from agent.config.model import
Settings``); this package itself defines nothing.

- :mod:`agent.config.model`: the settings as frozen dataclasses (Settings,
  Disk, Hook, Commands, KeepFree, MailReport, PingReport) and pure helpers over them
  (:func:`~agent.config.model.effective_excludes`).
- :mod:`agent.config.validate`: parsed TOML in, Settings out, pure: the rules
  for each value and table (:func:`~agent.config.validate.settings_from_mapping`),
  and which programs a file names.
- :mod:`agent.config.trust`: whether only root can have written a file or a
  program (:func:`~agent.config.trust.check_trusted`,
  :func:`~agent.config.trust.untrusted_program`), reading a password file
  only its owner can read (:func:`~agent.config.trust.read_secret`), and
  whether root was reached through sudo.
- :mod:`agent.config.load`: reading, decoding and parsing the file, then
  validating it and checking its trust (:func:`~agent.config.load.load_settings`).
- :mod:`agent.config.messages`: how every refusal is told, in one line that
  names the file, the ``table.key``, the value found and what was expected.

Imports run one way: load uses validate and trust, which use messages and
model; nothing here imports the engine, the disk or the desktop agent.
"""
