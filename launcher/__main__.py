import sys

from launcher.cli import main

if __name__ == "__main__":  # not when the bench's spawned processes import the main module again
    sys.exit(main())
