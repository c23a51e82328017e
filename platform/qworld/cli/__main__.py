"""``python -m qworld.cli``: the ``qworld`` script."""

import sys

from qworld.cli import main

if __name__ == "__main__":  # importing the module (the packaging test imports every one) runs nothing
    sys.exit(main())
