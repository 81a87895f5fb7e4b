"""``python -m daemon ...`` is the ``sluice`` command."""

import sys

from daemon.cli import main

sys.exit(main())
