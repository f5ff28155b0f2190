"""End-to-end benchmarks (``speccascade bench``); the microbenchmarks live in ``bench/``."""
