"""Kernels: plain functions on raw arrays (NumPy or CuPy, through `xp`).

conv.py (convolution, upsampling), norm.py (group norm, + SiLU), attention.py
(softmax, attention), activations.py. Each gives the formulas it implements in
its docstring; the ops of functional.py wire them into the graph.
"""
