"""Every config either loads or is refused in one line with exit 2: never a traceback.

Mutated configs (hypothesis): the shipped example with one value replaced by
something else (text, huge numbers, deep nesting, rsync rule prefixes,
absurd durations), or with bytes cut, doubled or inserted. Each goes through
the real command line (``backup-agent list --config``) in-process, and what
loads must also give a valid rsync command line, as ``backup`` builds it.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.engine import rsync
from agent.cli import main
from agent.config.load import load_settings
from agent.config.model import effective_excludes
from agent.core.errors import EXIT_OK, EXIT_USAGE, ConfigError
from agent.repository.store import Repository

EXAMPLE = (Path(__file__).parent.parent / "examples" / "config.toml").read_text()
LINES = EXAMPLE.splitlines()
ASSIGNMENTS = [index for index, line in enumerate(LINES) if re.match(r"^\s*[a-z_]+\s*=", line)]

TOML_VALUES = st.one_of(
    st.integers().map(str),
    st.integers(min_value=10**15).map(str),
    st.booleans().map(lambda value: str(value).lower()),
    st.text(max_size=30).map(lambda text: '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'),
    st.sampled_from(['"+ /etc"', '"- /x"', '"!"', '["+ /etc"]', '["!"]', '[""]', '"99999999999999999999d"',
                     '"1s"', '"0"', '"-1h"', '"1h1h"', '{}', '[[]]', '"../x"', '"relative"', '1.5', 'nan', 'inf']),
    st.integers(min_value=1, max_value=3000).map(lambda depth: "[" * depth + "]" * depth),
)


@st.composite
def mutated(draw: st.DrawFn) -> str:
    lines = list(LINES)
    index = draw(st.sampled_from(ASSIGNMENTS))
    key = lines[index].split("=", 1)[0].strip()
    if draw(st.booleans()):
        lines[index] = f"{key} = {draw(TOML_VALUES)}"
    else:
        # Keys the example leaves out, in the table this line belongs to.
        extra = draw(st.sampled_from(["exclude", "interval", "keep_free", "timeout", key]))
        lines.insert(index + 1, f"{extra} = {draw(TOML_VALUES)}")
    text = "\n".join(lines) + "\n"
    if draw(st.booleans()):
        at = draw(st.integers(min_value=0, max_value=len(text)))
        cut = draw(st.integers(min_value=0, max_value=8))
        text = text[:at] + draw(st.text(max_size=4)) + text[at + cut :]
    return text


@pytest.fixture(scope="module")
def repository() -> str:
    directory = tempfile.mkdtemp(prefix="config-fuzz-")
    return Repository.create(directory + "/repo").root


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=mutated())
def test_every_config_loads_or_fails_in_one_line_with_exit_2(
    text: str, repository: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "config.toml"
        path.write_text(text, encoding="utf-8", errors="surrogateescape")
        code = main(["list", "--config", str(path), repository])
        err = capsys.readouterr().err.strip()
        assert code in (EXIT_OK, EXIT_USAGE), err
        if code == EXIT_USAGE:
            assert len(err.splitlines()) == 1 and str(path) in err, err
            with pytest.raises(ConfigError):
                load_settings(str(path))
            return
        loaded = load_settings(str(path))
    # What backup builds from it must not fail either (it once did, for exclude = ["+ /etc"]).
    rsync.build_argv(
        rsync=loaded.commands.rsync, source="/", target="/target/x.in-progress", link_dests=[],
        one_file_system=loaded.one_file_system, excludes=effective_excludes(loaded), filter_rules=[],
        io_timeout=loaded.io_timeout, dry_run=False, priority_prefix=(),
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[backup]\nexclude = ["+ /etc"]\n', "backup.exclude[0]"),
        ("[backup]\nexclude = " + "[" * 2000 + "]" * 2000 + "\n", "nested more than"),
        ('[agent]\ninterval = "99999999999999999999d"\n', "agent.interval"),
        ('[agent]\ninterval = "367d"\n', "at most"),
        ("[backup]\nexclude = " + "[" * 40 + "]" * 40 + "\n", "nested more than"),
    ],
)
def test_inputs_that_crashed_are_refused_in_one_line(text: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    assert main(["list", "--config", str(path), str(tmp_path / "nowhere")]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err


def test_an_exclude_given_on_the_command_line_is_checked_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.toml"
    config.write_text("")
    (tmp_path / "src").mkdir()
    code = main(["backup", "--no-sudo", "--config", str(config), "-x", "+ /etc", str(tmp_path / "src"), str(tmp_path / "repo")])
    assert code == EXIT_USAGE
    assert "filter rule" in capsys.readouterr().err
    assert not (tmp_path / "repo").exists()
