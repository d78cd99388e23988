"""`python -m workers ...`: one peer in the foreground, without Ray (see workers/peer/standalone.py)."""

import sys

from workers.peer.standalone import main

if __name__ == "__main__":
    sys.exit(main())
