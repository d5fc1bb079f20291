"""`python -m diffused_heads ...` is the `diffused-heads` command (and what `accelerate launch -m` runs)."""

import sys

from .cli import main

sys.exit(main())
