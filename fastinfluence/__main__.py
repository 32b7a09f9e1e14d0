"""``python -m fastinfluence <command>``; see ``fastinfluence.cli``."""

import sys

from fastinfluence.cli import main

sys.exit(main())
