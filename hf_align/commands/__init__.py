"""CLI command registry. A command is one module here defining a module-level `COMMAND = CommandSpec(...)`;
modules are discovered automatically, so adding a command touches no other file."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class CommandSpec:
    name: str  # `hf-align <name>`
    help: str
    argument_classes: tuple  # dataclasses parsed by HfArgumentParser, in the order `run` receives them
    run: Callable[..., int | None]


def _discover() -> dict[str, CommandSpec]:
    commands = {}
    for module in pkgutil.iter_modules(__path__):
        spec = getattr(importlib.import_module(f"{__name__}.{module.name}"), "COMMAND", None)
        if isinstance(spec, CommandSpec):
            commands[spec.name] = spec
    return commands


COMMANDS = _discover()
