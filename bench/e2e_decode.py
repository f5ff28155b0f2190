"""End-to-end decoding benchmark on the default real pair: ``speccascade bench`` as a script.

    .venv/bin/python bench/e2e_decode.py --out docs/results/<date>-<machine>-e2e   # flags as the command

See :mod:`speccascade_fast.bench.e2e` for what is measured and how.
"""
import sys

from speccascade_fast.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
