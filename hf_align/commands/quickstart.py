"""`hf-align quickstart`: the whole pipeline offline in a few minutes (or on the encoders and dataset you name)."""

from __future__ import annotations

from ..experiments.quickstart import QuickstartArguments, run_quickstart
from .base import CommandSpec


def run(args: QuickstartArguments) -> int:
    run_quickstart(args)
    return 0


COMMAND = CommandSpec("quickstart", __doc__.split(": ", 1)[1], (QuickstartArguments,), run)
