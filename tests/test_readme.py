"""Every fastcifar command the README and docs/ show parses with the CLI's own parser."""

import re
import shlex
from pathlib import Path

import pytest

from fastcifar import cli

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def shown_commands(text: str) -> list[str]:
    """The fastcifar commands in fenced blocks and inline code, each without what precedes it on
    its line (`pip install ... &&`, `torchrun ... -m`) or a trailing comment; usage brackets
    ([--flag]) are opened and the first of alternatives (a|b) taken."""
    blocks = re.findall(r"^```\w*\n(.*?)^```", text, re.S | re.M)
    lines = [line for block in blocks for line in block.splitlines()]
    lines += re.findall(r"`([^`\n]*fastcifar [^`\n]*)`", text)
    commands = []
    for line in lines:
        match = re.search(r"(?:^|&&\s*|-m\s+)fastcifar\s+(.*)", line.split(" #")[0])
        if match and not line.lstrip().startswith(("import", "from")):
            args = match.group(1).replace("[", "").replace("]", "")
            commands.append(re.sub(r"(\S+)\|\S+", r"\1", args).strip())
    return commands


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_shown_parses(page):
    commands = shown_commands(page.read_text())
    for command in commands:
        argv = shlex.split(command)
        try:
            cli.build_parser(cli._preset_asked(argv)).parse_args(argv)
        except SystemExit as exit:
            if exit.code == 0:  # --help
                continue
            pytest.fail(f"{page.name}: `fastcifar {command}` does not parse")
    if page.name == "README.md":
        assert {c.split()[0] for c in commands} >= {"train", "speedrun", "bench", "eval", "report", "data"}
