"""`python -m trainer <command>`: the trainer's commands (data, train, evaluate, export)."""
import sys

from shared.cli import main

sys.exit(main(group="trainer"))
