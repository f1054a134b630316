"""Hooks: the user's commands around the whole cycle or around the transfer.

PiServer backup's design, held to rule 3 of docs/ARCHITECTURE.md. A hook is a pair of argv
commands (``before``, ``after``) around a stage, ``"backup"`` (the whole
cycle, say stopping a service) or ``"snapshot"`` (the transfer, say a
database dump):

- every hook whose ``before`` succeeded (or that has none) is *entered*, and
  every entered hook gets its ``after``, in reverse order, whatever happened
  in between: an error, an interruption, another hook failing;
- a failed critical ``before`` stops the stage before anything is written
  (:class:`~agent.core.errors.HookError`); a failed non-critical one is a warning;
- a failed ``after`` is only a warning: it never hides what went wrong
  before it, and the snapshot it follows is already complete.

Commands run through the one :class:`~agent.core.commands.Runner` (argv, no shell,
a clean environment plus the ``BACKUP_AGENT_*`` variables, a timeout). The
cycle owns the :class:`HookContext` and fills it in as it learns things, so
after-hooks see the snapshot made while they waited.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shlex
from dataclasses import dataclass
from typing import Callable, Final, Iterator, Sequence

from agent.core.commands import Runner
from agent.config.model import Hook
from agent.core.errors import BackupAgentError, CommandError, HookError

log = logging.getLogger(__name__)

STAGES: Final[tuple[str, ...]] = ("backup", "snapshot")
STEPS: Final[tuple[str, ...]] = ("before_backup", "after_backup", "before_snapshot", "after_snapshot")
OUTCOMES: Final[tuple[str, ...]] = ("success", "failure")

# An environment string has a kernel limit (128 KiB); a message that long
# helps no hook. Kept well below so the after-hook always starts.
_ERROR_LIMIT: Final = 2000
_WHITESPACE: Final = re.compile(r"\s+")
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")


@dataclass
class HookContext:
    """What hooks are told; the cycle updates it as it learns (e.g. the snapshot name)."""

    disk: str | None = None
    repository: str | None = None
    snapshot: str | None = None


def _one_line(text: str) -> str:
    """Text as one line: a hook reads it from one variable, a log shows it on one line."""
    line = _CONTROL.sub("", _WHITESPACE.sub(" ", text)).strip()
    if len(line) > _ERROR_LIMIT:
        line = line[: _ERROR_LIMIT - 1] + "…"
    return line


def describe_exception(exc: BaseException) -> str:
    """One line saying what went wrong, for BACKUP_AGENT_ERROR and warnings.

    Our own errors are written for users and stand alone; anything else
    (a bug, KeyboardInterrupt) is named by its type, since its text alone may
    be empty or cryptic.
    """
    text = _one_line(str(exc))
    if isinstance(exc, BackupAgentError) and text:
        return text
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


def hook_environment(context: HookContext, step: str, outcome: str | None, error: str | None) -> dict[str, str]:
    """The variables a hook gets on top of the clean environment (pure).

    Unknown values are empty strings rather than missing, so a hook written
    with ``set -u`` still runs. ``BACKUP_AGENT_OUTCOME`` exists only in
    after-hooks; ``BACKUP_AGENT_ERROR`` only after a failure.
    """
    if step not in STEPS:
        raise ValueError(f"unknown hook step {step!r}; expected one of {', '.join(STEPS)}")
    after = step.startswith("after_")
    if after and outcome not in OUTCOMES:
        raise ValueError(f"an after-hook needs an outcome ({' or '.join(OUTCOMES)}), got {outcome!r}")
    if not after and outcome is not None:
        raise ValueError(f"a before-hook has no outcome, got {outcome!r}")
    if error is not None and outcome != "failure":
        raise ValueError("an error is told only after a failure")
    env = {
        "BACKUP_AGENT_DISK": context.disk or "",
        "BACKUP_AGENT_REPOSITORY": context.repository or "",
        "BACKUP_AGENT_SNAPSHOT": context.snapshot or "",
        "BACKUP_AGENT_STEP": step,
    }
    if outcome is not None:
        env["BACKUP_AGENT_OUTCOME"] = outcome
    if error is not None:
        env["BACKUP_AGENT_ERROR"] = _one_line(error)
    return env


def _run(
    runner: Runner,
    hook: Hook,
    argv: Sequence[str],
    step: str,
    context: HookContext,
    outcome: str | None,
    error: str | None,
) -> None:
    """Run one command of a hook; raises CommandError when it fails or times out."""
    log.info("running %s hook %r (%s)", hook.around, hook.name, step)
    runner.run(
        argv,
        step=step,
        env=hook_environment(context, step, outcome, error),
        # 0 is "no limit", as "0" is in every duration of the config.
        timeout=hook.timeout if hook.timeout > 0 else None,
    )


def _run_afters(
    stage: str,
    entered: Sequence[Hook],
    runner: Runner,
    context: HookContext,
    warn: Callable[[str], None],
    error: str | None,
) -> BaseException | None:
    """Run the after-commands of the entered hooks, last entered first.

    Every one runs, whatever the others do. A failed command is a warning.
    Anything else raised meanwhile (an interruption, a bug) is warned about
    too, and the first such is returned so the caller can raise it once
    cleanup is done, unless a failure of its own is already on its way.
    """
    step = f"after_{stage}"
    outcome = "success" if error is None else "failure"
    pending: BaseException | None = None
    for hook in reversed(entered):
        if hook.after is None:
            continue
        try:
            _run(runner, hook, hook.after, step, context, outcome, error)
        except CommandError as failure:
            warn(f"{stage} hook {hook.name!r} failed after the {stage}: {_one_line(failure.message)}")
        except BaseException as exc:  # noqa: BLE001 - the remaining afters must still run
            warn(f"{stage} hook {hook.name!r} was stopped after the {stage}: {describe_exception(exc)}")
            if pending is None:
                pending = exc
    return pending


def _dry_run(stage: str, selected: Sequence[Hook], which: str) -> None:
    """Say what would run, in the order it would run."""
    step = f"{which}_{stage}"
    order = selected if which == "before" else list(reversed(selected))
    for hook in order:
        argv = hook.before if which == "before" else hook.after
        if argv is not None:
            log.info("dry run: would run %s hook %r (%s): %s", stage, hook.name, step, shlex.join(argv))


@contextlib.contextmanager
def around(
    stage: str,
    hooks: Sequence[Hook],
    runner: Runner,
    context: HookContext,
    warn: Callable[[str], None],
    *,
    dry_run: bool = False,
) -> Iterator[None]:
    """Run the stage's before-hooks, the block, then the after-hooks of those entered.

    Only hooks with ``around == stage`` take part, in config order. Raises
    HookError (nothing of the block has run) when a critical before-hook
    fails, after the hooks already entered got their after-commands. The
    block's own exception always propagates unchanged; after-hooks see it as
    outcome ``failure`` with its one-line message.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown hook stage {stage!r}; expected one of {', '.join(STAGES)}")
    selected = [hook for hook in hooks if hook.around == stage]
    if dry_run:
        # Said explicitly rather than left to the Runner's dry run, so that
        # nothing here depends on how the runner was built.
        _dry_run(stage, selected, "before")
        try:
            yield
        finally:
            _dry_run(stage, selected, "after")
        return

    before_step = f"before_{stage}"
    entered: list[Hook] = []
    for hook in selected:
        if hook.before is not None:
            try:
                _run(runner, hook, hook.before, before_step, context, None, None)
            except CommandError as failure:
                cause = _one_line(failure.message)
                if hook.critical:
                    message = f"{stage} hook {hook.name!r} failed: {cause}; nothing was written"
                    _run_afters(stage, entered, runner, context, warn, message)
                    raise HookError(message, step=before_step) from failure
                warn(
                    f"{stage} hook {hook.name!r} failed, carrying on as it is not critical: {cause}"
                    + ("; its after-command will not run" if hook.after is not None else "")
                )
                continue
            except BaseException as exc:
                # Interrupted while a before-hook ran: the hooks already
                # entered still get their afters, then the interruption goes on.
                _run_afters(stage, entered, runner, context, warn, describe_exception(exc))
                raise
        entered.append(hook)

    try:
        yield
    except BaseException as exc:
        _run_afters(stage, entered, runner, context, warn, describe_exception(exc))
        raise
    pending = _run_afters(stage, entered, runner, context, warn, None)
    if pending is not None:
        raise pending
