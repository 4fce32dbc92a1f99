"""``python3 -m bitserve ...``: the same as the ``bitserve`` command, for when the script
directory is not on ``PATH``."""

import sys

from bitserve.cli import main

sys.exit(main())
