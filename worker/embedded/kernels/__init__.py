"""GPU kernels of the embedded engine (Triton). Each has a reference in plain PyTorch
that bench/kernel_check.py compares it with on fresh random inputs."""

from __future__ import annotations

import sys


def compiled_variants() -> int:
    """Compiled variants of every Triton kernel of this package loaded so far. The engine
    builds all it needs before it reports ready: one more after that is a compile that
    stalled a step (EngineStats.kernel_compiles_late)."""
    from triton.runtime.jit import JITFunction

    total = 0
    for name, module in list(sys.modules.items()):
        if not name.startswith(__name__ + ".") or module is None:
            continue
        for obj in vars(module).values():
            if isinstance(obj, JITFunction):
                for cache in getattr(obj, "device_caches", {}).values():  # device -> (kernels by key, ...)
                    total += len(cache[0] if isinstance(cache, tuple) else cache)
    return total
