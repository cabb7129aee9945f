"""`python -m analysis --config ... --adapter ... --output-dir ...`: the same as scripts/analyze.py."""

import sys

from analysis.commands import analyze_main

if __name__ == "__main__":
    sys.exit(analyze_main())
