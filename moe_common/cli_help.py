"""One help format for every console script: defaults shown, docstrings kept as written.

argparse's ArgumentDefaultsHelpFormatter appends "(default: None)" and "(default: False)"
to flags that have no default worth naming (optional paths, store_true switches); this
formatter names a default only when it is a value, and leaves help that already says
%(default)s alone. Descriptions and epilogs keep their line breaks (usage examples).
"""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if "%(default)" in help_text or not shows_default(action):
            return help_text
        return f"{help_text} (default: %(default)s)"


def shows_default(action: argparse.Action) -> bool:
    """Whether --help names this action's default: a flag whose default is a value."""
    return (bool(action.option_strings) and action.default is not None and action.default is not False
            and action.default is not argparse.SUPPRESS)
