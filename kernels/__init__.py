"""fastgen's Triton kernels, imported as ``fastgen.kernels``: one op family per module.

These modules import triton and torch only, never the rest of fastgen; fastgen.functional wraps
them in autograd Functions and validates their inputs.
"""
