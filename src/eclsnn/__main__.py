"""``python -m eclsnn`` (and ``torchrun -m eclsnn train ...``)."""

import sys

from eclsnn.cli import main

sys.exit(main())
