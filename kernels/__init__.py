"""diffrt.kernels: fused kernels, their launchers and the backend registry.

* :func:`attention` - inference attention (launcher; backends "triton", "torch", "reference"),
  with ToDo key/value downsampling (:class:`KVDownsample`) and block sparsity (:class:`BlockMask`,
  builders in :mod:`~diffrt.kernels.attention_masks`); :func:`attention_reference` is its spec.
* :func:`solver_step` - the fused solver step (launcher; backends "reference", "cpu", "cuda");
  :class:`PreparedStep` checks and dispatches it once for a caller stepping the same buffers.
* :func:`solver_step_reference` - its PyTorch spec.
* :mod:`registry` - the op registry: ``registry.explain("solver_step", x, cond, ...)`` says
  which backend runs a call and why the others do not.

Importing this package never touches the GPU; the compiled module ``_C`` and Triton are loaded
on first use.
"""
from . import attention_masks, registry
from .attention_spec import BlockMask, KVDownsample, attention_reference
from .attention_launch import attention
from .registry import BackendUnavailable
from .solver_step import solver_step_reference
from .solver_step_launch import PreparedStep, solver_step

__all__ = ["BackendUnavailable", "BlockMask", "KVDownsample", "PreparedStep", "attention", "attention_masks", "attention_reference",
           "registry", "solver_step", "solver_step_reference"]
