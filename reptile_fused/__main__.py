"""``python -m reptile_fused``: the ``reptile-fused`` command line."""

import sys

from .cli import main

sys.exit(main())
