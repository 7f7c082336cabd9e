"""The bottom layer: checks of settings, the registry every component kind uses, confinement of artefact paths and
file integrity, torch's CPU threads, process groups, and the table of moved names. Imports nothing else of hf_align."""
