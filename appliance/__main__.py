"""``python -m appliance`` entry point (see :mod:`appliance.cli`)."""

import sys

from appliance.cli import main

sys.exit(main())
