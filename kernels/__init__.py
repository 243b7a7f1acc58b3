"""diffrt.kernels: fused kernels, their launchers and the backend registry.

* :func:`solver_step` - the fused solver step (launcher; backends "reference", "cpu", "cuda").
* :func:`solver_step_reference` - its PyTorch spec.
* :mod:`registry` - the op registry: ``registry.explain("solver_step", x, cond, ...)`` says
  which backend runs a call and why the others do not.

Importing this package never touches the GPU; the compiled module ``_C`` is loaded on first use.
"""
from . import registry
from .registry import BackendUnavailable
from .solver_step import solver_step_reference
from .solver_step_launch import solver_step

__all__ = ["BackendUnavailable", "registry", "solver_step", "solver_step_reference"]
