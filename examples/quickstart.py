"""Offline quickstart as a script: `python examples/quickstart.py` (same as `hf-align quickstart`)."""

from hf_align.experiments.quickstart import QuickstartArguments, run_quickstart

if __name__ == "__main__":
    run_quickstart(QuickstartArguments())
