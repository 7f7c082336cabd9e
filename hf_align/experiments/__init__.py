"""Experiments built on the library, kept apart from it (as open_clip keeps `open_clip_train`): method comparison,
data-efficiency curves, the offline quickstart, the synthetic paired task and the digits dataset.

The library (`hf_align.*` outside this package) never imports from here; the CLI commands and the tests do.
"""
