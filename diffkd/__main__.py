"""``python -m diffkd`` (what ``torchrun -m diffkd`` runs)."""

import sys

from diffkd.cli import main

sys.exit(main())
