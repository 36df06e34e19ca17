"""`python -m galip ...` is the `galip` command."""

import sys

from .cli import main

sys.exit(main())
