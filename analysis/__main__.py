"""`python -m analysis --config ... --adapter ... --output-dir ...`: the same as scripts/analyze.py."""

import sys

from scripts.analyze import main

if __name__ == "__main__":
    sys.exit(main())
