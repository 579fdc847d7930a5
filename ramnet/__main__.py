"""``python -m ramnet``: the ``ramnet`` command, for machines where the package is on the path
but not installed (no console script)."""

import sys

from .cli import main

sys.exit(main())
