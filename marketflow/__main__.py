"""``python -m marketflow``: the daemon (see marketflow.entrypoints.cli)."""

import sys

from marketflow.entrypoints.cli import main

if __name__ == "__main__":
    sys.exit(main())
