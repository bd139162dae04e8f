"""`python -m launcher.train RUN_DIR`: the per-rank entrypoint (launcher/train/entry.py)."""

import sys

from launcher.train.entry import main

sys.exit(main())
