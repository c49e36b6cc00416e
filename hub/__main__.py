"""`python -m hub ...` runs the hub's command line."""

import sys

from hub.cli import main

sys.exit(main())
