"""`python -m seg ...`: see seg/cli.py for the subcommands."""
import sys

import minidl  # noqa: F401  (first: it sets the Numba thread policy, see minidl/__init__.py)
from seg.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
