"""Every console script's --help gives text for every flag and names every default that is a value.

The scripts come from pyproject.toml's [project.scripts], so a new one is checked without
editing this file; each script's module exposes build_parser() for it.
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from moe_common.cli_help import shows_default

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def _parsers(name: str, parser: argparse.ArgumentParser):
    """(name, parser) for the parser and each subcommand's parser, depth first."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(f"{name} {sub_name}", sub)


def _all_parsers():
    out = []
    for script, target in sorted(SCRIPTS.items()):
        module = importlib.import_module(target.split(":")[0])
        out.extend(_parsers(script, module.build_parser()))
    return out


PARSERS = _all_parsers()


def test_every_console_script_is_covered():
    names = {n.split()[0] for n, _ in PARSERS}
    assert names == set(SCRIPTS)
    # moe-predictor's subcommands are checked as parsers of their own.
    assert {"moe-predictor collect", "moe-predictor train", "moe-predictor eval", "moe-predictor serve"} <= {
        n for n, _ in PARSERS}


@pytest.mark.parametrize("name,parser", PARSERS, ids=[n for n, _ in PARSERS])
def test_every_flag_has_help_and_names_its_default(name, parser, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100000")  # one line per flag: the check below reads whole help strings
    text = parser.format_help()
    missing_help, missing_default = [], []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if not (action.help or "").strip():
            missing_help.append(action.option_strings or action.dest)
            continue
        if shows_default(action):
            shown = parser._get_formatter()._expand_help(action)
            if "%(default)" not in action.help and f"(default: {action.default})" not in shown:
                missing_default.append(action.option_strings)
            assert shown in text, (name, action.option_strings)
    assert not missing_help, f"{name}: flags without help: {missing_help}"
    assert not missing_default, f"{name}: --help names no default for {missing_default}"


@pytest.mark.parametrize("name,parser", PARSERS, ids=[n for n, _ in PARSERS])
def test_no_none_or_false_defaults_are_printed(name, parser, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100000")
    text = parser.format_help()
    assert "(default: None)" not in text and "(default: False)" not in text


def test_help_runs_from_the_command_line():
    """One smoke run of the real entry point: --help exits 0 and shows a default."""
    out = subprocess.run([sys.executable, "-m", "gateway", "--help"], capture_output=True, text=True, timeout=120,
                         env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"}, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "--max-input-tokens" in out.stdout and "(default: 512)" in out.stdout
