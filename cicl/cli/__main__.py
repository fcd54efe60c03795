"""``python -m cicl.cli``."""

import sys

from cicl.cli import main

sys.exit(main())
