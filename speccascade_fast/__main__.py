"""``python -m speccascade_fast``: the ``speccascade`` command line (see :mod:`.cli`)."""
import sys

from .cli import main

sys.exit(main())
