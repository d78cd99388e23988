"""`python -m workers ...`: one peer in the foreground, without Ray (see workers/standalone.py)."""

import sys

from workers.standalone import main

if __name__ == "__main__":
    sys.exit(main())
