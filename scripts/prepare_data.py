"""Prepare a corpus under data/ (the only network access of the project): see deqlm.data.prepare."""

import sys

from deqlm.data.prepare import main

if __name__ == "__main__":
    sys.exit(main())
