"""`python -m kdfleet ...`: the `kdfleet` command."""
import sys

from kdfleet.cli import main

sys.exit(main())
