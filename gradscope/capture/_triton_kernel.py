"""The source of the Triton kernel of :mod:`gradscope.capture.triton_moments` (imported only when Triton is).

Undecorated here: :func:`gradscope.capture.triton_moments._define` applies ``triton.jit`` (compiled for
CUDA, or interpreted for the tests' CPU tensors). Unlike every other module it does not import
``annotations`` from ``__future__``: Triton reads the ``tl.constexpr`` annotations at decoration, and
older Triton versions expect objects there, not strings.
"""

import triton.language as tl


def moments_kernel(
    ptrs, numels, tile_tensor, tile_start, part, BLOCK: tl.constexpr, DTYPE: tl.constexpr, ACC: tl.constexpr
):
    """Seven partials of one tile into ``part[pid]``.

    One program per tile of ``BLOCK`` entries of tensor ``tile_tensor[pid]``, from ``tile_start[pid]``:
    sum, sum of squares, min, max, non-zero, non-finite and NaN counts.
    """
    pid = tl.program_id(0)
    k = tl.load(tile_tensor + pid)
    start = tl.load(tile_start + pid)
    n = tl.load(numels + k)
    base = tl.load(ptrs + k).to(tl.pointer_type(DTYPE))
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(base + offs, mask=mask, other=0.0).to(ACC)
    one = tl.full([BLOCK], 1.0, ACC)
    zero = tl.full([BLOCK], 0.0, ACC)
    out = part + pid * 7
    tl.store(out + 0, tl.sum(x, axis=0))
    tl.store(out + 1, tl.sum(x * x, axis=0))
    tl.store(out + 2, tl.min(tl.where(mask, x, float("inf")), axis=0))
    tl.store(out + 3, tl.max(tl.where(mask, x, -float("inf")), axis=0))
    tl.store(out + 4, tl.sum(tl.where(x != 0.0, one, zero), axis=0))
    # x - x is 0 for a finite entry, NaN for NaN and Inf (masked entries are 0.0: finite)
    tl.store(out + 5, tl.sum(tl.where(x - x == 0.0, zero, one), axis=0))
    tl.store(out + 6, tl.sum(tl.where(x != x, one, zero), axis=0))


def pair_kernel(
    a_ptrs,
    b_ptrs,
    numels,
    tile_tensor,
    tile_start,
    part,
    BLOCK: tl.constexpr,
    DTYPE: tl.constexpr,
    ACC: tl.constexpr,
    COPY: tl.constexpr,
):
    """The sum of squares of one tile into ``part[pid]``.

    Of ``a`` (and ``a`` copied into ``b``) when ``COPY``, of ``a - b`` otherwise: the weight snapshot
    of a sampled step, and its update.
    """
    pid = tl.program_id(0)
    k = tl.load(tile_tensor + pid)
    start = tl.load(tile_start + pid)
    n = tl.load(numels + k)
    a = tl.load(a_ptrs + k).to(tl.pointer_type(DTYPE))
    b = tl.load(b_ptrs + k).to(tl.pointer_type(DTYPE))
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(a + offs, mask=mask, other=0.0)
    if COPY:
        tl.store(b + offs, x, mask=mask)
        d = x.to(ACC)
    else:
        d = x.to(ACC) - tl.load(b + offs, mask=mask, other=0.0).to(ACC)
    tl.store(part + pid, tl.sum(d * d, axis=0))
