"""``python -m fedlora_fast``: the ``fedlora-fast`` command line."""

import sys

from fedlora_fast.cli import main

sys.exit(main())
