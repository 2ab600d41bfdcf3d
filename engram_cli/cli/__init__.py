"""The `engram` command line: option parsing, resolution of presets, files and clusters, rendering."""

from .app import app, main

__all__ = ["app", "main"]
