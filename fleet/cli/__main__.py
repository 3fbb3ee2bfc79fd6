"""``python -m fleet.cli``: what Ray jobs run (the same entry point as ``fleet``)."""

import sys

from fleet.cli import main

sys.exit(main())
