"""`python -m qoper8d`: the daemon, as the `qoper8d` console script runs it."""

from __future__ import annotations

import sys

from qoper8d.cli import daemon_main

if __name__ == "__main__":
    sys.exit(daemon_main())
