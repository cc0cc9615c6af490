"""Every `rung` command and flag the README shows exists in the CLI (parsed from the README's code blocks and inline
code against rung's own argparse parser), so the README cannot drift from `--help`."""

from __future__ import annotations

import argparse
import re

from conftest import REPO

from rung.cli import build_parser


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def commands_in_readme(text: str) -> list[str]:
    found = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        block = block.replace("\\\n", " ")
        for line in block.splitlines():
            stripped = line.strip()
            if stripped.startswith("rung "):
                found.append(stripped)
            elif found and line.startswith(" ") and stripped.startswith(("[", "--")):
                found[-1] += " " + stripped  # a continuation of the command above
    found += [m for m in re.findall(r"`(rung [^`]+)`", text)]
    return found


def resolve(parser: argparse.ArgumentParser, words: list[str]) -> tuple[argparse.ArgumentParser, list[str]]:
    """Descend through subcommand words ('jobs status|logs|stop' takes the first alternative)."""
    path = []
    while (choices := subcommands(parser)) and words:
        word = words[0].split("|")[0]
        assert word in choices, f"README shows `rung {' '.join(path + [words[0]])}`, which the CLI lacks"
        parser, path, words = choices[word], path + [word], words[1:]
    return parser, path


def test_every_command_and_flag_in_the_readme_exists():
    text = (REPO / "README.md").read_text()
    commands = commands_in_readme(text)
    assert len(commands) >= 15, commands
    checked = 0
    for command in commands:
        outer, _, inner = command.partition(" -- ")
        parser, path = resolve(build_parser(), outer.split()[1:])
        known = {flag for action in parser._actions for flag in action.option_strings}
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", outer):
            assert flag in known, f"README: `rung {' '.join(path)}` has no {flag} ({command!r})"
            checked += 1
        if inner.startswith("rung "):
            commands.append(inner)
    assert checked >= 40
