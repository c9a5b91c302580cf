"""``python -m reptile_fused``: hands over to the ``reptile-fused`` command line in :mod:`reptile_fused.app`."""

import sys

from .app.cli import main

sys.exit(main())
