"""``python -m simulators.graph``: run the Graph simulator until SIGTERM/SIGINT."""

from __future__ import annotations

import sys

from .server import main

raise SystemExit(main(sys.argv[1:]))
