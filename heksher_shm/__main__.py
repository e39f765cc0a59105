"""``python -m heksher_shm`` runs the ``heksher-shm`` command line."""

import sys

from heksher_shm.cli import main

sys.exit(main())
