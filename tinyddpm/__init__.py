"""tinyddpm: Denoising Diffusion Probabilistic Models (Ho, Jain, Abbeel 2020) on the
`autograd` engine of this repository, with NumPy on the CPU and CuPy on a GPU."""

__version__ = "0.1.0"
