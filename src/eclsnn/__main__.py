"""``python -m eclsnn`` (and ``torchrun -m eclsnn train ...``)."""

import sys

from .cli import main

sys.exit(main())
