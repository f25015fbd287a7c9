"""Every moment of a sampled step in one pass over the gradients, on a CUDA device: a Triton kernel.

On an accelerator a sampled step takes all six gradient moments (sum, sum of squares, min, max,
non-zero and non-finite counts). The multi-tensor path (:func:`gradscope.capture.kernels.foreach_moments`)
has no multi-tensor signed sum, min or count, so it builds them from temporaries: 12 passes over the
gradients (``neg``, ``clamp_min`` and ``sign`` each write a copy and read it again). On a model whose
gradients are hundreds of MB, a sampled step is bound by that memory traffic.

:func:`triton_moments` reads each gradient **once** for all six moments, in **one** kernel launch for
all the gradients of a dtype, plus a fixed number of small operators that combine the partial results:

* the gradients are cut into tiles of :data:`BLOCK` entries; one program per tile reads its tile
  once and writes seven partials (sum, sum of squares, min, max, non-zero, non-finite and NaN counts),
  accumulated in float32 (float64 for float64 gradients);
* the tiles find their tensor through a table of data pointers (copied to the device at each call,
  from pinned memory, without waiting: gradients are new tensors at every step) and a table of
  ``(tensor, offset)`` per tile, made once per set of sizes;
* the partials of each tensor are added in float64 on the device (``index_add_``, ``scatter_reduce_``):
  exact counts, and sums as accurate as the float64 reference to about 1e-6 relative in float32.

Triton ships with PyTorch's CUDA builds. The kernel is used on CUDA tensors when ``triton`` imports
and a self-check of the compiled kernel against PyTorch's own reductions passes, once per process,
device and dtype. The check is launched at the first sampled step (where Triton compiles the kernel:
seconds, once) and its answer read at a later one, once the device has finished it: until then,
when it fails, and for anything the kernel cannot read (a tensor subclass such as a DTensor shard,
a non-contiguous gradient, mixed dtypes, deterministic algorithms on, a CUDA graph being captured),
the multi-tensor path runs as before. ``GRADSCOPE_TRITON=off`` turns it off.

Tests run the same kernel on CPU tensors with Triton's interpreter (``TRITON_INTERPRET=1``, set before
Triton is first imported in the process), where every program is NumPy code:
:func:`triton_moments` with ``interpret=True``.

Nothing here synchronises with the device, the self-check included.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["BLOCK", "TRITON_ENV", "triton_moments", "triton_state"]

#: Environment variable: ``auto`` (default: use the kernel on CUDA tensors when Triton is installed and
#: its self-check passes) or ``off``.
TRITON_ENV = "GRADSCOPE_TRITON"

#: Entries per tile (one program). 4096 float32 entries are 16 KiB read per program: enough work per
#: program for a memory-bound kernel, and tens of thousands of programs on a 100M-entry model.
BLOCK = 4096

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_lock = threading.Lock()
# (interpret) -> the jitted kernel, or an Exception when Triton could not build it
_built: dict[bool, Any] = {}
# (interpret, device, dtype) -> "ready" | "failed: ..." | (event, flag) while the self-check is in flight
_checked: dict[tuple[bool, Any, torch.dtype], Any] = {}
# (device, numels, block) -> _Tiles
_tiles: dict[tuple[Any, tuple[int, ...], int], _Tiles] = {}


class _Tiles:
    """The tile tables of one set of tensor sizes on one device (made once, reused every sampled step)."""

    __slots__ = ("empty", "numels", "start", "tensor")

    def __init__(self, numels: Sequence[int], block: int, device: torch.device) -> None:
        tensor: list[int] = []
        start: list[int] = []
        for k, n in enumerate(numels):
            for s in range(0, n, block):
                tensor.append(k)
                start.append(s)
        self.tensor = torch.tensor(tensor, dtype=torch.int64, device=device)
        self.start = torch.tensor(start, dtype=torch.int64, device=device)
        self.numels = torch.tensor(list(numels), dtype=torch.int64, device=device)
        self.empty = torch.tensor([n == 0 for n in numels], dtype=torch.bool, device=device)


@contextlib.contextmanager
def _interpreting(interpret: bool) -> Iterator[None]:
    """``TRITON_INTERPRET=1`` for the duration (Triton reads it when it decorates and when it launches)."""
    if not interpret:
        yield
        return
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = before


def _build(interpret: bool) -> Any:
    """``(kernel, triton.language)``, or the exception that kept Triton from building it."""
    got = _built.get(interpret)
    if got is not None:
        return got
    with _lock:
        got = _built.get(interpret)
        if got is None:
            try:
                with _interpreting(interpret):
                    got = _define()
            except Exception as exc:  # no triton, or one that cannot work here: the multi-tensor path
                got = exc
            _built[interpret] = got
    return got


def _define() -> tuple[Any, Any]:
    import triton
    import triton.language as tl

    # The kernel's source lives in a module that imports Triton at its top: Triton's interpreter
    # patches the `tl` it finds in the kernel's globals (a `tl` in a closure would not be patched).
    from gradscope.capture import _triton_kernel

    return triton.jit(_triton_kernel.moments_kernel), tl


def triton_state(device: torch.device, dtype: torch.dtype, *, interpret: bool = False) -> str:
    """Whether the kernel runs on this device and dtype.

    ``ready``, ``off``, ``unchecked`` (not used yet), ``checking`` (the self-check is in flight on the
    device) or ``failed: <why>``.
    """
    if os.environ.get(TRITON_ENV, "auto") == "off":
        return "off"
    state = _checked.get((interpret, device, dtype), "unchecked")
    return "checking" if isinstance(state, tuple) else state


def triton_moments(grads: Sequence[Tensor], *, interpret: bool = False, block: int = BLOCK) -> Tensor | None:
    """``[len(grads), 6]`` float64 moments (``GRAD_MOMENTS`` order) of ``grads``, in one pass; None when it does not apply.

    Applies to CUDA tensors (CPU tensors with ``interpret=True``: Triton's interpreter, for tests) of one
    dtype (float16, bfloat16, float32, float64), dense and contiguous, plain tensors (no subclass), once
    the kernel has passed its self-check on that device and dtype (on CUDA it is launched at the first
    call, which returns None, and read at a later one). Nothing but the self-check is launched when it
    returns None.

    Min and max are NaN for a tensor holding NaN (as ``torch.min``), 0 for an empty tensor (as the
    other paths).
    """
    if not grads or os.environ.get(TRITON_ENV, "auto") == "off":
        return None
    first = grads[0]
    device, dtype = first.device, first.dtype
    if device.type != ("cpu" if interpret else "cuda") or dtype not in _DTYPES:
        return None
    if torch.are_deterministic_algorithms_enabled():
        return None  # the partials are added with index_add_ (atomics on CUDA): the multi-tensor path
    if not interpret and torch.cuda.is_current_stream_capturing():
        return None  # a CUDA graph would freeze this step's pointer table
    for g in grads:
        if type(g) is not Tensor or g.dtype != dtype or g.device != device or not g.is_contiguous() or g.is_sparse:
            return None
    key = (interpret, device, dtype)
    state = _checked.get(key)
    if state is None or isinstance(state, tuple):
        state = _checked[key] = _self_check(device, dtype, interpret, block, state)
    if state != "ready":
        return None
    return _launch(list(grads), interpret, block)


def _launch(grads: list[Tensor], interpret: bool, block: int) -> Tensor:
    built = _build(interpret)
    kernel, tl = built
    device, dtype = grads[0].device, grads[0].dtype
    numels = tuple(g.numel() for g in grads)
    key = (device, numels, block)
    tiles = _tiles.get(key)
    if tiles is None:
        if len(_tiles) >= 8:
            _tiles.clear()
        tiles = _tiles[key] = _Tiles(numels, block, device)
    n_tiles = tiles.tensor.numel()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    n = len(grads)
    if n_tiles:
        # The gradients' addresses change at every step (zero_grad(set_to_none=True) frees them): a
        # table of n int64 copied from pinned memory, without waiting for the device.
        ptrs = torch.tensor([g.data_ptr() for g in grads], dtype=torch.int64, pin_memory=not interpret)
        if not interpret:
            ptrs = ptrs.to(device, non_blocking=True)
        part = torch.empty(n_tiles, 7, dtype=acc, device=device)
        tl_dtype = {
            torch.float16: tl.float16,
            torch.bfloat16: tl.bfloat16,
            torch.float32: tl.float32,
            torch.float64: tl.float64,
        }[dtype]
        tl_acc = tl.float64 if acc == torch.float64 else tl.float32
        with _interpreting(interpret):
            kernel[(n_tiles,)](
                ptrs,
                tiles.numels,
                tiles.tensor,
                tiles.start,
                part,
                BLOCK=block,
                DTYPE=tl_dtype,
                ACC=tl_acc,
                num_warps=8,
            )
        p = part.to(torch.float64)
    else:  # every tensor is empty
        p = torch.zeros(0, 7, dtype=torch.float64, device=device)
    sums = torch.zeros(n, 7, dtype=torch.float64, device=device).index_add_(0, tiles.tensor, p)
    inf = float("inf")
    mn = torch.full((n,), inf, dtype=torch.float64, device=device).scatter_reduce_(0, tiles.tensor, p[:, 2], "amin")
    mx = torch.full((n,), -inf, dtype=torch.float64, device=device).scatter_reduce_(0, tiles.tensor, p[:, 3], "amax")
    extremes = torch.stack([mn, mx], dim=1)
    extremes = extremes.masked_fill(tiles.empty[:, None], 0.0).masked_fill(sums[:, 6:7] > 0, float("nan"))
    return torch.cat([sums[:, :2], extremes, sums[:, 4:6]], dim=1)


def _self_check(device: torch.device, dtype: torch.dtype, interpret: bool, block: int, pending: Any) -> Any:
    """Run the kernel once on tensors whose moments are known and compare with PyTorch's reductions.

    On CUDA without waiting: the comparison is a device flag copied into pinned memory behind an event,
    and the answer is read at a later call, once the event has completed (until then the multi-tensor
    path runs). Returns ``"ready"``, ``"failed: <why>"`` (never used on this device and dtype), or the
    pending ``(event, flag)``. A kernel that fails to build or to launch here is a failure too.
    """
    if pending is not None:
        event, flag = pending
        if not event.query():
            return pending
        # sync point: CPU tensors only; pinned host memory that the completed event says is written.
        return "ready" if bool(flag[0]) else "failed: the self-check disagreed with torch"
    built = _build(interpret)
    if isinstance(built, Exception):
        return f"failed: {type(built).__name__}: {built}"
    try:
        g = torch.Generator().manual_seed(0)
        base = torch.randn(3 * block + 5, generator=g)
        with_nan = torch.tensor([1.0, float("nan"), -2.0, float("inf"), 0.0])
        xs = [base, torch.zeros(7), with_nan, torch.tensor([-3.0, float("-inf")]), torch.zeros(0), torch.ones(1)]
        # (made on the host, then copied: no device allocation waits for anything)
        xs = [x.to(dtype).pin_memory().to(device, non_blocking=True) if not interpret else x.to(dtype) for x in xs]
        got = _launch(xs, interpret, block)
        want = torch.stack([_reference(x) for x in xs])
        close = (got - want).abs() <= 1e-6 + 1e-4 * want.abs()
        agree = (close | (got == want) | (got.isnan() & want.isnan())).all().reshape(1)
        if interpret:
            # sync point: CPU tensors only (the interpreter's own process).
            return "ready" if bool(agree[0]) else "failed: the self-check disagreed with torch"
        flag = torch.empty(1, dtype=torch.bool, pin_memory=True)
        flag.copy_(agree, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return (event, flag)
    except Exception as exc:  # a kernel that cannot run here: the multi-tensor path
        return f"failed: {type(exc).__name__}: {exc}"


def _reference(x: Tensor) -> Tensor:
    """The six moments of ``x`` by PyTorch's own reductions in float64 (the self-check's reference)."""
    d = x.double()
    if d.numel() == 0:
        return torch.zeros(6, dtype=torch.float64, device=x.device)
    return torch.stack(
        [
            d.sum(),
            (d * d).sum(),
            d.min(),
            d.max(),
            (d != 0).sum().double(),
            (~torch.isfinite(d)).sum().double(),
        ]
    )
