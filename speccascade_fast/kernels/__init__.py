"""Triton kernels of the ``"triton"`` backend (composed by :mod:`speccascade_fast.backends.triton`),
each module holding its kernels and their launcher (``launch``).

The verification's modules are named after the reference backend's stages (targets, accept,
resample, insert), a fused kernel after every stage it runs:

* :mod:`.targets`                - ``targets``: per (position, vocabulary slice) max / argmax /
  Σexp (``targets_kernel``), then, for the rules that need them, the sums that need the row's
  log-partitions (``targets_sums_kernel``: TV, eta, lossy's law) or lossy_star's 1/beta
  (``targets_lossy_star_kernel``);
* :mod:`.accept_resample_insert` - ``accept`` + ``resample`` + ``insert`` in one kernel (it first
  takes the targets' decisions from their statistics), the Gumbel-max race split over slices;

and the other kinds of work of the triton backend:

* :mod:`.sample`      - the drafter's draw from qT (:func:`speccascade_fast.sample` on CUDA);
* :mod:`.keep_bounds` - top-p's keep bound per row, by a search over the logits' bits (no sort);

with their shared pieces:

* :mod:`.rng`    - the counter-based RNG, bit-exact with :mod:`speccascade_fast.rng`;
* :mod:`.common` - rule ids, the statistics layout and the pointwise formulas;
* :mod:`.launch` - the launchers' host-side helpers (slice widths, warps, the interpreter check).

Importing this package decorates the kernels: with ``TRITON_INTERPRET=1`` set at that moment they
run in Triton's CPU interpreter (tests), otherwise they compile for the GPU.
"""
from .accept_resample_insert import accept_resample_insert_kernel
from .keep_bounds import keep_final_kernel, keep_max_kernel, keep_pass_kernel, keep_ties_kernel
from .rng import uniform_kernel
from .sample import sample_merge_kernel, sample_slices_kernel
from .targets import targets_kernel, targets_lossy_star_kernel, targets_sums_kernel

__all__ = [
    "accept_resample_insert_kernel", "keep_final_kernel", "keep_max_kernel", "keep_pass_kernel",
    "keep_ties_kernel", "sample_merge_kernel", "sample_slices_kernel", "targets_kernel",
    "targets_lossy_star_kernel", "targets_sums_kernel", "uniform_kernel",
]
