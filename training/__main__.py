"""``python -m sd35_flash.training CONFIG ...``: the training CLI (what torchrun launches)."""

import sys

from .cli import main

sys.exit(main())
