"""Printing for the CLIs: aligned tables for people, JSON/YAML for machines."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import click
import yaml
from rich.console import Console
from rich.table import Table, box

from wardgate.errors import WardgateError

FORMATS = click.Choice(["text", "json", "yaml"])
# Piped output is read by scripts and grep: never wrap it at 80 columns.
console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 4000)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, empty: str = "") -> None:
    if not rows and empty:
        console.print(empty)
        return
    t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
    for h in headers:
        t.add_column(h, overflow="fold")
    for r in rows:
        t.add_row(*["" if v is None else str(v) for v in r])
    console.print(t)


def details(pairs: Sequence[tuple[str, Any]]) -> None:
    """Aligned `Key: value` lines, for one record (a profile, a status)."""
    width = max((len(k) for k, _ in pairs), default=0) + 1
    for key, value in pairs:
        console.print(f"{key + ':':<{width}} {'' if value is None else value}", markup=False)


def dump(data: Any, fmt: str) -> None:
    if fmt == "json":
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        click.echo(yaml.safe_dump(data, sort_keys=False, default_flow_style=False).rstrip())


def fail(message: str, code: int = 1) -> NoReturn:
    err_console.print(f"[bold red]ERROR:[/] {message}", markup=True)
    sys.exit(code)


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn our errors into one clear line on stderr and exit 1, never a traceback."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except WardgateError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            fail("interrupted", 130)

    return wrapper
