"""Write docs/cli.md from the CLIs' own --help, so the reference can never drift from the code.

Run: .venv/bin/python scripts/gen_cli_docs.py  (tests/test_docs.py fails when the file is stale)
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from wardgate.cli.ward import main as ward
from wardgate.cli.wardctl import main as wardctl
from wardgate.cli.wardgate import main as wardgate

OUT = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


def _walk(cmd: click.Command, path: list[str], out: list[str]) -> None:
    ctx = click.Context(
        cmd,
        info_name=" ".join(path),
        terminal_width=100,
        max_content_width=100,
        help_option_names=["-h", "--help"],
    )
    level = "#" * min(len(path) + 1, 4)
    out.append(f"{level} `{' '.join(path)}`\n")
    out.append("```text\n" + cmd.get_help(ctx).rstrip() + "\n```\n")
    if isinstance(cmd, click.Group):
        for name in sorted(cmd.list_commands(ctx)):
            sub = cmd.get_command(ctx, name)
            if sub is not None:
                _walk(sub, [*path, name], out)


def render() -> str:
    out = [
        "# Command reference\n",
        "Generated from each command's `--help` by `scripts/gen_cli_docs.py`; do not edit by hand.\n",
    ]
    for name, cmd in (("wardgate", wardgate), ("wardctl", wardctl), ("ward", ward)):
        _walk(cmd, [name], out)
    return "\n".join(out)


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        sys.exit(0 if OUT.exists() and OUT.read_text() == text else 1)
    OUT.write_text(text)
    print(f"wrote {OUT}")
