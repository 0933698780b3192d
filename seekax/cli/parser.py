"""The parser every `seekax` subcommand uses: help that shows defaults, and library errors reported as usage
errors that name the flag which fed the failing parameter (`argument --ranks: ...`, exit 2), as argparse
reports its own."""

from __future__ import annotations

import argparse
import re
import sys
from typing import Mapping

# The message of seekax.ir.validate.fail (`name=value: expected ...`); value may itself hold ": ", so the
# first ": expected" ends it.
_NAME = r"[A-Za-z_][\w.]*(?:\[[^\]=:]*\][\w.]*)*"     # prompts, weight.shape, prompts[0], block_table[1, 0]
_FAIL = re.compile(rf"(?P<name>{_NAME})=(?P<value>.*?): expected (?P<expected>.*)", re.S)
# A kernel's NotImplementedError: `name=value[, name=value ...]: what the kernel supports`.
_UNSUPPORTED = re.compile(r"(?P<subject>[A-Za-z_][\w.]*=[^:]*?): (?P<rest>.*)", re.S)
_ASSIGNMENT = re.compile(r"\b(?P<name>[A-Za-z_][\w.]*)=")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's help ends with its default, except switches (default False) and unset options (None)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


class CommandParser(argparse.ArgumentParser):
    """argparse.ArgumentParser that knows which library parameter each of its arguments feeds.

    params: library parameter name -> this parser's `dest` for names that differ (`num_ranks` -> `ranks`);
    a parameter named like a dest (`costs`, `seq_len`) needs no entry. Nested subparsers are this class too,
    and each records itself as `cli_parser` in the parsed namespace, so errors carry the full command name.
    """

    def __init__(self, *args, params: Mapping[str, str] | None = None, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.params = dict(params or {})
        self.set_defaults(cli_parser=self)

    def flag_for(self, name: str) -> str | None:
        """The argument (`--ranks`, or a positional's name) that fed parameter `name` (`weight.shape`, `weight[0]`:
        `weight`)."""
        for key in (name, re.split(r"[.\[]", name)[0]):
            dest = self.params.get(key, key)
            for action in self._actions:
                if action.dest == dest and action.dest != argparse.SUPPRESS:
                    if action.option_strings:
                        return "/".join(action.option_strings)
                    return action.metavar if isinstance(action.metavar, str) else action.dest
        return None

    def _flags_in(self, text: str) -> str:
        """`a multiple of num_gpus=4` -> `a multiple of --gpus=4`, for the parameter names in `params` only
        (a dest's own name may be a common word or sit inside a config's repr)."""
        if not self.params:
            return text
        words = re.compile(r"(?<![\w.-])(" + "|".join(map(re.escape, sorted(self.params, key=len, reverse=True)))
                           + r")(?![\w.])")
        return words.sub(lambda m: self.flag_for(m.group()) or m.group(), text)

    def describe(self, error: Exception) -> str | None:
        """One line for a library error, or None when it is not a usage error (a bug: keep its traceback).

        ValueError in seekax.ir.validate.fail's format: the argument, what it expected, the value given.
        NotImplementedError (valid input a kernel does not handle): the argument and what the kernel supports.
        """
        text = str(error)
        if isinstance(error, NotImplementedError):
            m = _UNSUPPORTED.fullmatch(text)
            if m is None:
                return f"not supported: {self._flags_in(text) or type(error).__name__}"
            names = _ASSIGNMENT.findall(m["subject"])
            flag = self.flag_for(names[0]) if len(names) == 1 else None
            if flag:
                value = m["subject"].split("=", 1)[1]
                return f"argument {flag}: {value} is not supported: {self._flags_in(m['rest'])}"
            subject = _ASSIGNMENT.sub(lambda a: f"{self.flag_for(a['name']) or a['name']}=", m["subject"])
            return f"not supported: {subject}: {self._flags_in(m['rest'])}"
        m = _FAIL.fullmatch(text)
        if m is None:
            return None
        flag = self.flag_for(m["name"])
        expected = self._flags_in(m["expected"])
        if not flag:
            return f"{m['name']}={m['value']}: expected {expected}"
        given = m["value"] if re.fullmatch(r"[\w]+", m["name"]) else f"{m['name']}={m['value']}"
        return f"argument {flag}: expected {expected}, got {given}"

    def fail_usage(self, message: str) -> int:
        """Print `prog: error: message` to stderr, as parser.error does (without the usage block), and return 2."""
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        return 2
