"""`python -m hueyserve`: the command line (hueyserve.cli)."""

from hueyserve.cli import main

main()
