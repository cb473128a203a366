"""`python -m seg ...`: see seg/cli.py for the subcommands."""
import sys

from seg.cli import main

if __name__ == "__main__":
    sys.exit(main())
