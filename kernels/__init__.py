"""Triton kernels, installed as ``subspace_optim.kernels``.

Each kernel will sit beside a pure-PyTorch reference with the same signature; the
references live in the core package so that nothing here is imported unless Triton is.
"""
