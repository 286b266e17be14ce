"""Matmuls on VMEM tiles shared by the Pallas kernels (ssd.py, gdn.py): fp32 accumulation, named by
which operand is transposed."""

import jax.numpy as jnp
from jax import lax

F32 = jnp.float32


def dot(a, b, dims):
    """fp32 accumulation; fp32 operands at full fp32 precision (as XLA's form at "highest"), bf16
    operands in one MXU pass (an explicit precision: Mosaic rejects fp32 contract precision on bf16)."""
    both_f32 = a.dtype == F32 and b.dtype == F32
    precision = lax.Precision.HIGHEST if both_f32 else lax.Precision.DEFAULT
    return lax.dot_general(a, b, (dims, ((), ())), precision=precision, preferred_element_type=F32)


def nt(a, b):  # a [m, k] . b [n, k]^T -> [m, n]
    return dot(a, b, ((1,), (1,)))


def nn(a, b):  # a [m, k] . b [k, n] -> [m, n]
    return dot(a, b, ((1,), (0,)))


def tn(a, b):  # a [k, m]^T . b [k, n] -> [m, n]
    return dot(a, b, ((0,), (0,)))
