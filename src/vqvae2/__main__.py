"""``python -m vqvae2`` runs the same CLI as the ``vqvae2`` console script."""

import sys

from .cli import main

sys.exit(main())
