"""``python -m s3pipes``: the ``s3pipes`` command."""

import sys

from s3pipes.cli import main

if __name__ == "__main__":
    sys.exit(main())
