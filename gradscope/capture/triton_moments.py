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
a gradient with gaps between its entries (a strided view; channels-last and other permuted
layouts are read as they lie), mixed dtypes, deterministic algorithms on, a CUDA graph being
captured), the multi-tensor path runs as before. ``GRADSCOPE_TRITON=off`` turns it off.

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

__all__ = ["BLOCK", "TRITON_ENV", "dense_layout", "triton_moments", "triton_pair_sumsq", "triton_state"]

#: Environment variable: ``auto`` (default: use the kernel on CUDA tensors when Triton is installed and
#: its self-check passes) or ``off``.
TRITON_ENV = "GRADSCOPE_TRITON"

#: Entries per tile (one program). 4096 float32 entries are 16 KiB read per program: enough work per
#: program for a memory-bound kernel, and tens of thousands of programs on a 100M-entry model.
BLOCK = 4096

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_PLAIN = (Tensor, torch.nn.Parameter)  # not a subclass with its own storage rules (a DTensor shard)
_lock = threading.Lock()
# (interpret) -> the jitted kernel, or an Exception when Triton could not build it
_built: dict[bool, Any] = {}
# (kind, interpret, device, dtype) -> "ready" | "failed: ..." | (event, flag) while the self-check is in flight
_checked: dict[tuple[str, bool, Any, torch.dtype], Any] = {}
# (device, numels, block) -> _Tiles
_tiles: dict[tuple[Any, tuple[int, ...], int], _Tiles] = {}


class _Tiles:
    """The tile tables of one set of tensor sizes on one device (made once, reused every sampled step)."""

    __slots__ = ("empty", "numels", "start", "tensor")

    def __init__(self, numels: Sequence[int], block: int, device: torch.device) -> None:
        # vectorised: a 7B-parameter model has about 1.7M tiles of 4,096 entries
        sizes = torch.tensor(list(numels), dtype=torch.int64)
        counts = (sizes + block - 1) // block
        tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), counts)
        first = torch.cumsum(counts, 0) - counts  # index of each tensor's first tile
        start = (torch.arange(len(tensor), dtype=torch.int64) - first[tensor]) * block
        self.tensor = _to_device(tensor, device)
        self.start = _to_device(start, device)
        self.numels = _to_device(sizes, device)
        self.empty = _to_device(sizes == 0, device)


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """A small host tensor on ``device``, copied from pinned memory without waiting (a pageable copy waits)."""
    return t if device.type == "cpu" else t.pin_memory().to(device, non_blocking=True)


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


def _define() -> tuple[Any, Any, Any]:
    import triton
    import triton.language as tl

    # The kernels' source lives in a module that imports Triton at its top: Triton's interpreter
    # patches the `tl` it finds in a kernel's globals (a `tl` in a closure would not be patched).
    from gradscope.capture import _triton_kernel

    return triton.jit(_triton_kernel.moments_kernel), triton.jit(_triton_kernel.pair_kernel), tl


def triton_state(device: torch.device, dtype: torch.dtype, *, interpret: bool = False, kind: str = "moments") -> str:
    """Whether a kernel (``moments``, or ``pair``: the weights' copy and update) runs on this device and dtype.

    ``ready``, ``off``, ``unchecked`` (not used yet), ``checking`` (the self-check is in flight on the
    device) or ``failed: <why>``.
    """
    if os.environ.get(TRITON_ENV, "auto") == "off":
        return "off"
    state = _checked.get((kind, interpret, device, dtype), "unchecked")
    return "checking" if isinstance(state, tuple) else state


def _usable(lists: Sequence[Sequence[Tensor]], interpret: bool) -> tuple[torch.device, torch.dtype] | None:
    """``(device, dtype)`` when every tensor of ``lists`` (lists of equal length) can be read by a kernel."""
    if not lists[0] or os.environ.get(TRITON_ENV, "auto") == "off":
        return None
    first = lists[0][0]
    device, dtype = first.device, first.dtype
    if device.type != ("cpu" if interpret else "cuda") or dtype not in _DTYPES:
        return None
    if torch.are_deterministic_algorithms_enabled():
        return None  # the partials are added with index_add_ (atomics on CUDA): the multi-tensor path
    if not interpret and torch.cuda.is_current_stream_capturing():
        return None  # a CUDA graph would freeze this step's pointer table
    for tensors in lists:
        if len(tensors) != len(lists[0]):
            return None
        for g in tensors:
            if type(g) not in _PLAIN or g.dtype != dtype or g.device != device or g.is_sparse:
                return None
            if not dense_layout(g):  # read flat from data_ptr(): contiguous or permuted, no gaps
                return None
    for a, b in zip(*lists) if len(lists) > 1 else ():
        if a.shape != b.shape or a.stride() != b.stride():  # entry i of one must be entry i of the other
            return None
    return device, dtype


def dense_layout(t: Tensor) -> bool:
    """Whether ``t``'s entries fill one block of memory from ``data_ptr()``, in some order (no gaps, no overlap)."""
    if t.is_contiguous():
        return True
    expected = 1  # strides sorted, each must be the product of the sizes below it (channels-last, a transpose)
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _ready(kind: str, device: torch.device, dtype: torch.dtype, interpret: bool, block: int) -> bool:
    key = (kind, interpret, device, dtype)
    state = _checked.get(key)
    if state is None or isinstance(state, tuple):
        state = _checked[key] = _self_check(kind, device, dtype, interpret, block, state)
    return state == "ready"


def triton_moments(grads: Sequence[Tensor], *, interpret: bool = False, block: int = BLOCK) -> Tensor | None:
    """``[len(grads), 6]`` float64 moments (``GRAD_MOMENTS`` order) of ``grads``, in one pass; None when it does not apply.

    Applies to CUDA tensors (CPU tensors with ``interpret=True``: Triton's interpreter, for tests) of one
    dtype (float16, bfloat16, float32, float64), dense (contiguous, or permuted such as channels-last: the
    entries are read in memory order), plain tensors (no subclass), once
    the kernel has passed its self-check on that device and dtype (on CUDA it is launched at the first
    call, which returns None, and read at a later one). Nothing but the self-check is launched when it
    returns None.

    Min and max are NaN for a tensor holding NaN (as ``torch.min``), 0 for an empty tensor (as the
    other paths).
    """
    found = _usable([grads], interpret)
    if found is None or not _ready("moments", *found, interpret, block):
        return None
    return _launch(list(grads), interpret, block)


def triton_pair_sumsq(
    a: Sequence[Tensor], b: Sequence[Tensor], *, copy: bool, interpret: bool = False, block: int = BLOCK
) -> Tensor | None:
    """The weights' side of a sampled step in one kernel launch: ``[len(a)]`` float64 sums of squares.

    ``copy=True``: ``b[k] <- a[k]`` and the sum of squares of ``a[k]`` (the snapshot before the update
    and the weights' norm: one read and one write, where the multi-tensor path reads the weights twice
    and writes once). ``copy=False``: the sum of squares of ``a[k] - b[k]``, nothing written (the
    update: two reads, where the multi-tensor path reads three times and writes once). Applies as
    :func:`triton_moments` does (same dtype, shape and strides in both lists); None, nothing launched
    but the self-check, otherwise.
    """
    found = _usable([a, b], interpret)
    if found is None or not _ready("pair", *found, interpret, block):
        return None
    return _launch_pair(list(a), list(b), copy, interpret, block)


def _tiles_for(tensors: list[Tensor], block: int) -> _Tiles:
    device = tensors[0].device
    numels = tuple(t.numel() for t in tensors)
    key = (device, numels, block)
    tiles = _tiles.get(key)
    if tiles is None:
        if len(_tiles) >= 8:
            _tiles.clear()
        tiles = _tiles[key] = _Tiles(numels, block, device)
    return tiles


def _pointers(tensors: list[Tensor], interpret: bool) -> Tensor:
    """The tensors' addresses, as a table of int64 on their device.

    They change at every step (``zero_grad(set_to_none=True)`` frees the gradients), so the table is
    copied from pinned memory at each call, without waiting.
    """
    return _to_device(torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64), tensors[0].device)


def _types(tl: Any, dtype: torch.dtype) -> tuple[torch.dtype, Any, Any]:
    """``(torch accumulation dtype, Triton dtype, Triton accumulation dtype)``."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    tl_dtype = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}.get(
        dtype, tl.float64
    )
    return acc, tl_dtype, tl.float64 if acc == torch.float64 else tl.float32


def _launch(grads: list[Tensor], interpret: bool, block: int) -> Tensor:
    kernel, _, tl = _build(interpret)
    device, dtype = grads[0].device, grads[0].dtype
    tiles = _tiles_for(grads, block)
    n_tiles = tiles.tensor.numel()
    acc, tl_dtype, tl_acc = _types(tl, dtype)
    n = len(grads)
    if n_tiles:
        part = torch.empty(n_tiles, 7, dtype=acc, device=device)
        _run(kernel, [grads], tiles, part, block, interpret, DTYPE=tl_dtype, ACC=tl_acc)
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


def _launch_pair(a: list[Tensor], b: list[Tensor], copy: bool, interpret: bool, block: int) -> Tensor:
    _, kernel, tl = _build(interpret)
    device, dtype = a[0].device, a[0].dtype
    tiles = _tiles_for(a, block)
    n_tiles = tiles.tensor.numel()
    acc, tl_dtype, tl_acc = _types(tl, dtype)
    out = torch.zeros(len(a), dtype=torch.float64, device=device)
    if not n_tiles:
        return out
    part = torch.empty(n_tiles, dtype=acc, device=device)
    _run(kernel, [a, b], tiles, part, block, interpret, DTYPE=tl_dtype, ACC=tl_acc, COPY=copy)
    return out.index_add_(0, tiles.tensor, part.to(torch.float64))


def _run(
    kernel: Any, lists: list[list[Tensor]], tiles: _Tiles, part: Tensor, block: int, interpret: bool, **consts: Any
) -> None:
    """Launch ``kernel`` over the tiles: one pointer table per list, then the tile tables and ``part``."""
    tables = [_pointers(tensors, interpret) for tensors in lists]
    with _interpreting(interpret):
        kernel[(tiles.tensor.numel(),)](
            *tables, tiles.numels, tiles.tensor, tiles.start, part, BLOCK=block, num_warps=8, **consts
        )


def _answer(agree: Tensor, interpret: bool) -> Any:
    """``ready``/``failed`` at once in the interpreter; on CUDA the pending ``(event, flag)``, read later."""
    if interpret:
        # sync point: CPU tensors only (the interpreter's own process).
        return "ready" if bool(agree[0]) else "failed: the self-check disagreed with torch"
    flag = torch.empty(1, dtype=torch.bool, pin_memory=True)
    flag.copy_(agree, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return (event, flag)


def _pending(pending: Any) -> Any:
    """A self-check in flight: its answer once its event has completed, else still pending."""
    event, flag = pending
    if not event.query():
        return pending
    # sync point: CPU tensors only; pinned host memory that the completed event says is written.
    return "ready" if bool(flag[0]) else "failed: the self-check disagreed with torch"


def _samples(device: torch.device, dtype: torch.dtype, interpret: bool, block: int) -> list[Tensor]:
    """Tensors whose moments the self-checks know: several tiles, NaN and Inf, zeros, an empty one."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3 * block + 5, generator=g)
    with_nan = torch.tensor([1.0, float("nan"), -2.0, float("inf"), 0.0])
    xs = [base, torch.zeros(7), with_nan, torch.tensor([-3.0, float("-inf")]), torch.zeros(0), torch.ones(1)]
    # (made on the host, then copied: no device allocation waits for anything)
    return [_to_device(x.to(dtype), device) for x in xs]


def _agree(got: Tensor, want: Tensor) -> Tensor:
    close = (got - want).abs() <= 1e-6 + 1e-4 * want.abs()
    return (close | (got == want) | (got.isnan() & want.isnan())).all().reshape(1)


def _self_check(kind: str, device: torch.device, dtype: torch.dtype, interpret: bool, block: int, pending: Any) -> Any:
    """Run kernel ``kind`` once on tensors whose results are known and compare with PyTorch's reductions.

    On CUDA without waiting: the comparison is a device flag copied into pinned memory behind an event,
    and the answer is read at a later call, once the event has completed (until then the multi-tensor
    path runs). Returns ``"ready"``, ``"failed: <why>"`` (never used on this device and dtype), or the
    pending ``(event, flag)``. A kernel that fails to build or to launch here is a failure too.
    """
    if pending is not None:
        return _pending(pending)
    built = _build(interpret)
    if isinstance(built, Exception):
        return f"failed: {type(built).__name__}: {built}"
    try:
        xs = _samples(device, dtype, interpret, block)
        compare = _compare_moments if kind == "moments" else _compare_pair
        return _answer(compare(xs, interpret, block), interpret)
    except Exception as exc:  # a kernel that cannot run here: the multi-tensor path
        return f"failed: {type(exc).__name__}: {exc}"


def _compare_moments(xs: list[Tensor], interpret: bool, block: int) -> Tensor:
    got = _launch(xs, interpret, block)
    return _agree(got, torch.stack([_reference(x) for x in xs]))


def _compare_pair(xs: list[Tensor], interpret: bool, block: int) -> Tensor:
    """The pair kernel: the sums of squares of a difference, then the copy and its sums of squares."""
    a = [x.nan_to_num(posinf=5.0, neginf=-5.0) for x in xs]
    b = [torch.full_like(x, 0.5) for x in a]
    diff = _launch_pair(a, b, False, interpret, block)
    want_diff = torch.stack([((x.double() - y.double()) ** 2).sum() for x, y in zip(a, b)])
    copied = _launch_pair(a, b, True, interpret, block)
    want_copy = torch.stack([(x.double() ** 2).sum() for x in a])
    same = torch.stack([(x == y).all() for x, y in zip(a, b)]).all().reshape(1)
    return _agree(diff, want_diff) & _agree(copied, want_copy) & same


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
