"""`python -m client`: classify images and list models from the command line."""

import sys

from client.cli import main

if __name__ == "__main__":
    sys.exit(main())
