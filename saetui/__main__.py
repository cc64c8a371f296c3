"""``python -m saetui`` runs the command line."""

import sys

from saetui.cli import main

sys.exit(main())
