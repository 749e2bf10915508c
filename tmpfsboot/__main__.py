"""`python -m tmpfsboot`: the same as the `tmpfsboot` command."""

import sys

from .cli import main

sys.exit(main())
