"""`hf-align <command>`: thin shells over the API, one module per command in `hf_align/commands/`.

Each command declares its arguments as dataclasses parsed by `transformers.HfArgumentParser`; a YAML recipe
(`hub_configs/*.yaml`) given as the first argument supplies them instead, and flags after it override the recipe.
"""

from __future__ import annotations

import argparse
import json
import sys

import yaml
from transformers import HfArgumentParser

from . import COMMANDS


def parse_command_args(argument_classes, argv: list[str]):
    """Parse `[recipe.yaml] [--flag value ...]` into one instance of each dataclass."""
    parser = HfArgumentParser(argument_classes)
    recipe = {}
    if argv and argv[0].endswith((".yaml", ".yml")):
        with open(argv[0], encoding="utf-8") as handle:
            recipe = yaml.safe_load(handle) or {}
        if not isinstance(recipe, dict):
            raise ValueError(f"recipe {argv[0]!r} must be a YAML mapping of argument names to values")
        argv = argv[1:]
    known = {f for cls in argument_classes for f in cls.__dataclass_fields__}
    unknown = sorted(set(recipe) - known)
    if unknown:
        raise ValueError(f"recipe has unknown keys {unknown}; this command accepts {sorted(known)}")
    # Mappings in a recipe (e.g. method_kwargs) travel as the JSON strings the flags would carry.
    parser.set_defaults(**{k: json.dumps(v) if isinstance(v, dict) else v for k, v in recipe.items()})
    for action in parser._actions:  # a value from the recipe satisfies a required flag
        if action.dest in recipe:
            action.required = False
    return parser.parse_args_into_dataclasses(args=argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = argparse.ArgumentParser(prog="hf-align", description=__doc__.splitlines()[0])
    top.add_argument("command", choices=COMMANDS.names(), help="what to run; `hf-align <command> -h` for its options")
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0
    command = top.parse_args(argv[:1]).command
    spec = COMMANDS[command]
    rest = argv[1:]
    if rest and rest[0] in ("-h", "--help"):
        HfArgumentParser(spec.argument_classes, prog=f"hf-align {command}", description=spec.help).print_help()
        return 0
    return int(spec.run(*parse_command_args(spec.argument_classes, rest)) or 0)


if __name__ == "__main__":
    sys.exit(main())
