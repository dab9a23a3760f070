"""`python -m vram_operator` is the `vram-operator` command."""

import sys

from .cli import main

sys.exit(main())
