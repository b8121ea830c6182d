"""The README's console-script commands parse as written: every flag it shows exists
(issue 15: a user copies these verbatim). Parsing only; nothing is started."""

from __future__ import annotations

import importlib
import re
import shlex
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def readme_blocks() -> list[tuple[str, str]]:
    """(language, body) of every fenced bash and python block of the README, in order."""
    return re.findall(r"```(bash|python)\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def readme_commands() -> list[str]:
    """Each command line of the README's bash blocks that runs a console script, with
    continuation lines joined and comments dropped; lines with placeholders (..., <pid>) left out."""
    out = []
    for lang, block in readme_blocks():
        if lang != "bash":
            continue
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] in SCRIPTS and "..." not in line and "<" not in line:
                out.append(shlex.join(words))
    return out


COMMANDS = readme_commands()


def test_the_readme_shows_the_commands_a_user_runs_first():
    assert "moe-serve --model tiny --expert-servers 2 --port 50051" in COMMANDS
    assert any(c.startswith("moe-predictor train") for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_parses(command, monkeypatch):
    monkeypatch.chdir(ROOT)  # --config deploy/local/stack.yaml is relative to the repository
    script, *argv = shlex.split(command)
    module = importlib.import_module(SCRIPTS[script].split(":")[0])
    # moe-serve and moe-predictor parse with build_parser(); moe-serve's parse_args also reads --config.
    parse = module.parse_args if script == "moe-serve" else module.build_parser().parse_args
    parse(argv)
