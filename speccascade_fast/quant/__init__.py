"""Quantised weights on the CPU: GGUF block formats kept as they are (:mod:`.formats`), our
kernels and PyTorch's (:mod:`.kernels`), drop-in modules (:mod:`.modules`) and quantised model
loading (:mod:`.load`). The public entry points are in :mod:`speccascade_fast.quantize`."""
