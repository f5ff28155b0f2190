"""Triton kernels of the ``"triton"`` verification backend (see :mod:`speccascade_fast.backends.triton`).

One stage per module, named as in the reference backend:

* :mod:`.stats`       - stage 1 of ``targets``: per (position, vocab slice) max / argmax / Σexp;
* :mod:`.second_pass` - the sums that need the row's log-partitions (TV, eta, lossy's law) and
  lossy_star's bisection;
* :mod:`.resample`    - ``accept`` and ``resample`` (Gumbel-max race over the slices);
* :mod:`.sample`      - the drafter's draw from qT (:func:`speccascade_fast.sample` on CUDA);
* :mod:`.keep_bounds` - top-p's keep bound per row, by a search over the logits' bits (no sort);
* :mod:`.rng`         - the counter-based RNG, bit-exact with :mod:`speccascade_fast.rng`;
* :mod:`.common`      - rule ids, the statistics layout and the pointwise formulas.

Importing this package decorates the kernels: with ``TRITON_INTERPRET=1`` set at that moment they
run in Triton's CPU interpreter (tests), otherwise they compile for the GPU.
"""
from .keep_bounds import keep_final_kernel, keep_max_kernel, keep_pass_kernel, keep_ties_kernel
from .resample import accept_resample_kernel
from .rng import uniform_kernel
from .sample import sample_merge_kernel, sample_slices_kernel
from .second_pass import lossy_star_kernel, second_pass_kernel
from .stats import stats_kernel

__all__ = [
    "accept_resample_kernel", "keep_final_kernel", "keep_max_kernel", "keep_pass_kernel",
    "keep_ties_kernel", "lossy_star_kernel", "sample_merge_kernel", "sample_slices_kernel",
    "second_pass_kernel", "stats_kernel", "uniform_kernel",
]
