"""``python -m safegene_fast``: the ``safegene`` command (``doctor`` when given no command)."""

import sys

from safegene_fast.cli import main

sys.exit(main(sys.argv[1:] or ["doctor"]))
