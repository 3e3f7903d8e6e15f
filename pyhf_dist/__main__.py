"""``python -m pyhf_dist`` is the ``pyhf-dist`` command."""

import sys

from pyhf_dist.cli import main

if __name__ == "__main__":
    sys.exit(main())
