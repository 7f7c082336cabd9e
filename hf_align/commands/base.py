"""What a CLI command module declares: `COMMAND = CommandSpec(...)`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, repr=False)
class CommandSpec:
    """One `hf-align <name>` command.

    Args:
        name (`str`): the command word.
        help (`str`): one line for `hf-align -h`.
        argument_classes (`tuple`): dataclasses parsed by `HfArgumentParser`, in the order `run` receives them.
        run (`Callable`): `run(*parsed_dataclasses) -> exit status or None`.
    """

    name: str
    help: str
    argument_classes: tuple
    run: Callable[..., int | None]

    def __repr__(self) -> str:
        # what a duplicate command name reports: the name and where its `run` is defined
        return f"CommandSpec({self.name!r}, run={self.run.__module__}.{self.run.__qualname__})"
