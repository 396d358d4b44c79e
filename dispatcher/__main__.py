"""`python -m dispatcher` runs the same command as `dispatcher`."""

import sys

from dispatcher.cli import main

sys.exit(main())
