"""Help formatting shared by every `tca` parser (light: argparse only, no torch)."""
from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends "(default: X)" to an option's help unless the help already says it.

    Left out: flags (store_true and the like: off unless given), options whose default is None
    (their help says what happens without them) and help that already states its default
    ("%(default)s" or "default:").
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        help_ = action.help or ""
        if (
            "%(default)" in help_
            or "default:" in help_.lower()
            or action.default is None
            or action.default is argparse.SUPPRESS
            or action.nargs == 0
            or (not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE))
        ):
            return help_
        return help_ + " (default: %(default)s)"


def parser_tree(parser: argparse.ArgumentParser, prefix: str = "tca"):
    """Yield (command path, parser) for `parser` and every subcommand below it (for tests/docs)."""
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from parser_tree(sub, f"{prefix} {name}")
