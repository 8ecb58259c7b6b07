"""Raw-array kernels: forward and backward of the heavier ops, written once for
NumPy and CuPy through the array module `xp` of their inputs."""
