"""``python -m qworld.cli``: the ``qworld`` script."""

import sys

from qworld.cli import main

sys.exit(main())
