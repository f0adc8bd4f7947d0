"""``python -m fleet``: the fleet admin CLI (see ``python -m fleet --help``)."""

import sys

from fleet.cli import main

sys.exit(main())
