"""``python -m normsam`` (and ``torchrun -m normsam train ...``)."""

import sys

from normsam.cli import main

sys.exit(main())
