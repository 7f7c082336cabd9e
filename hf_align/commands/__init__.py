"""CLI commands: one module per command in this folder, each declaring `COMMAND = CommandSpec(...)`, registered here by
name in `COMMANDS`. Adding a command = such a module, plus its import and its entry in `_BUILTIN` below (imported by
name so that the import graph is static)."""

from __future__ import annotations

from ..utils.registry import Registry
from . import (
    analyze,
    benchmark,
    compare,
    data_efficiency,
    evaluate,
    extract,
    push,
    push_features,
    quickstart,
    select_layers,
    train,
)
from .base import CommandSpec

_BUILTIN = (
    analyze,
    benchmark,
    compare,
    data_efficiency,
    evaluate,
    extract,
    push,
    push_features,
    quickstart,
    select_layers,
    train,
)

COMMANDS: Registry[CommandSpec] = Registry("command", CommandSpec, classes=False)
for _module in _BUILTIN:
    COMMANDS.register(_module.COMMAND.name, _module.COMMAND)

__all__ = ["COMMANDS", "CommandSpec"]
