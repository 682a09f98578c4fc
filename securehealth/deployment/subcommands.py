"""The subcommands of server.py and client.py (`make-certs`, `make-key`).

A subcommand is its command with the flag of the same name given: `python client.py make-key
--client-id 2` is `python client.py --client-id 2 --make-key`. It comes first on the command
line, takes the command's other flags, has its own --help, and is listed in the command's.
"""

import argparse
import shutil
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field

from securehealth import settings
from securehealth.config import Settings

LISTING_INDENT = 24  # where a subcommand's summary starts in --help, as argparse's own help


@dataclass(frozen=True)
class CommandLine:
    """A command's argparse parser (from settings.make_parser) and its subcommands' parsers."""

    parser: settings.SettingsParser
    subcommands: dict[str, settings.SettingsParser] = field(default_factory=dict)

    def add_subcommand(
        self,
        name: str,
        summary: str,
        add_flags: Callable[[argparse.ArgumentParser], None],
        **implied: object,
    ) -> None:
        """Add the subcommand `name`, and list it in the command's --help.

        Parameters
        ----------
        name : str
            The subcommand, e.g. "make-certs".
        summary : str
            What it does, in a line: its --help's description and its line in the command's.
        add_flags : Callable[[argparse.ArgumentParser], None]
            Adds the command's own flags to the subcommand's parser (the settings it has).
        **implied : object
            The values of the flags it stands for, e.g. make_certs=True.
        """
        parser = self.parser
        description = textwrap.fill(summary[:1].upper() + summary[1:] + ".", _help_width())
        subcommand = settings.make_parser(description, parser.settings_names)
        subcommand.prog = f"{parser.prog} {name}"
        add_flags(subcommand)
        subcommand.set_defaults(**implied)
        self.subcommands[name] = subcommand
        listing = textwrap.fill(
            f"{summary}; its flags: {subcommand.prog} --help",
            width=max(LISTING_INDENT + 40, _help_width()),
            initial_indent=f"  {name}".ljust(LISTING_INDENT),
            subsequent_indent=" " * LISTING_INDENT,
        )
        parser.epilog = f"{parser.epilog or 'subcommands:'}\n{listing}"

    def parse(self, argv: list[str] | None = None) -> tuple[Settings, argparse.Namespace]:
        """Parse the command line as settings.parse does, by its subcommand's parser if it has one.

        Parameters
        ----------
        argv : list[str] | None
            The command line without the program's name; None: sys.argv's.

        Returns
        -------
        tuple[Settings, argparse.Namespace]
            The settings and the parsed arguments (exit 2 with one line where they are bad).
        """
        argv = sys.argv[1:] if argv is None else list(argv)
        if argv and argv[0] in self.subcommands:
            return settings.parse(self.subcommands[argv[0]], argv[1:])
        return settings.parse(self.parser, argv)


def _help_width() -> int:
    """The width argparse formats --help to: the terminal's, less 2."""
    return shutil.get_terminal_size().columns - 2
