"""The package version, in one place: pyproject.toml reads it, and everything else imports it from here."""

__version__ = "0.2.0.dev0"
