"""``python -m simulators.planner``: run the Planner simulator (same arguments as server.main)."""

import sys

from simulators.planner.server import main

raise SystemExit(main(sys.argv[1:]))
