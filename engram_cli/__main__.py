"""`python -m engram_cli`: the `engram` command."""

from .cli import main

main()
