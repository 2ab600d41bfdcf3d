"""How `engram --help` writes commands, the way uv, ruff and click write theirs.

Arguments are upper-case placeholders (`SPEC`, `[TEXT]` when optional), not typer's `{spec}`;
flags take no value, so they show no `<bool>`; choice options list their choices (the Literal
types of the option values do that in app.py); required options carry typer's `*` and
`[required]`. Every command and the group get this through `EngramCommand` and `EngramGroup`.
"""

from __future__ import annotations

from typing import Any

import typer.core


def _conventional(params: list[Any]) -> list[Any]:
    """Upper-case argument names and value-less flags, applied to a command's parameters (the
    `--help` option included, which click makes on demand)."""
    for param in params:
        if isinstance(param, typer.core.TyperArgument) and param.metavar is None:
            param.metavar = (param.name or "").upper()
        elif getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


def usage_pieces(command: Any, ctx: Any) -> list[str]:
    """`[OPTIONS] SPEC` or `[OPTIONS] [TEXT]`: required arguments bare, optional ones in brackets."""
    pieces = [command.options_metavar] if command.options_metavar else []
    for param in command.get_params(ctx):
        if isinstance(param, typer.core.TyperArgument):
            name = param.metavar or (param.name or "").upper()
            name = name if param.required else f"[{name}]"
            pieces.append(name + ("..." if param.nargs != 1 else ""))
    return pieces


class EngramCommand(typer.core.TyperCommand):
    """A command whose help follows the conventions above."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _conventional(super().get_params(ctx))

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return usage_pieces(self, ctx)


class EngramGroup(typer.core.TyperGroup):
    """The `engram` group: its own options (`--version`, `--help`) follow the conventions too."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _conventional(super().get_params(ctx))
