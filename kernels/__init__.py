"""diffrt.kernels: fused kernels, their launchers and the backend registry."""
from .solver_step import solver_step_reference


def solver_step(x, cond, uncond, history, noise, table, itable, step, out=None, backend="auto"):
    """Temporary dispatcher: the reference path (the registry replaces this)."""
    return solver_step_reference(x, cond, uncond, history, noise, table, itable, step, out=out)


__all__ = ["solver_step", "solver_step_reference"]
