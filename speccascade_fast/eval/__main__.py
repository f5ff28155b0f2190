"""``python -m speccascade_fast.eval``: see :mod:`speccascade_fast.eval.cli`."""
import sys

from .cli import main

sys.exit(main())
