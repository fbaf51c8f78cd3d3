"""GPU kernels of the embedded engine (Triton). Each has a reference in plain PyTorch
that bench/kernel_check.py compares it with on fresh random inputs."""

from __future__ import annotations

import importlib
import pkgutil


def jit_functions() -> list:
    """Every Triton kernel of this package (its modules imported)."""
    from triton.runtime.jit import JITFunction

    found = {}  # by id: a helper such as pdl.enter is imported into several modules
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        found.update((id(obj), obj) for obj in vars(module).values() if isinstance(obj, JITFunction))
    return list(found.values())


def compiled_variants(kernels: list) -> int:
    """Compiled variants of `kernels` (from jit_functions) so far. The engine builds all it
    needs before it reports ready: one more after that is a compile that stalled a step
    (EngineStats.kernel_compiles_late)."""
    total = 0
    for fn in kernels:
        for cache in getattr(fn, "device_caches", {}).values():  # device -> (kernels by key, ...)
            total += len(cache[0] if isinstance(cache, tuple) else cache)
    return total
