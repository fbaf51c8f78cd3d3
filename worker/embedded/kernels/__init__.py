"""GPU kernels of the embedded engine (Triton). Each has a reference in plain PyTorch
that bench/kernel_check.py compares it with on fresh random inputs."""
