"""The command line's own rules: global options on either side of the subcommand."""

from __future__ import annotations

import pytest

from agent.cli import build_parser, main
from agent.core.errors import EXIT_USAGE


@pytest.mark.parametrize(
    "argv",
    [
        ["-q", "--config", "c.toml", "init", "--disk", "d"],
        ["init", "-q", "--config", "c.toml", "--disk", "d"],
        ["-q", "init", "--config", "c.toml", "--disk", "d"],
    ],
)
def test_global_options_are_taken_before_and_after_the_subcommand(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert (args.command, args.quiet, args.verbose, args.config, args.disk) == ("init", True, False, "c.toml", "d")


def test_without_global_options_the_defaults_hold() -> None:
    args = build_parser().parse_args(["list"])
    assert (args.quiet, args.verbose, args.config) == (False, False, None)
    assert build_parser().parse_args(["-v", "status"]).verbose is True


def test_config_before_a_subcommand_that_reads_none_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", "c.toml", "status"]) == EXIT_USAGE
    assert capsys.readouterr().err == "backup-agent: status reads no config: leave out --config c.toml\n"
