"""`python -m trainer <command>`: the trainer's commands (data, train, evaluate, export)."""
import sys

from kdfleet.cli import main

sys.exit(main(group="trainer"))
