"""`python -m trainer <command>`: the trainer's commands (trainer/commands.py)."""
import sys

from trainer.commands import main

sys.exit(main())
