"""Launch plans for the CUDA involution kernels: geometry, arguments, outputs.

Pure PyTorch and numpy, no CuPy: outputs are allocated, and inputs densified, by
``_memory_format`` (as the fake functions and the CPU kernels do), ``_cupy.launch``
executes the plans, and tests run the same plans on a host emulation of the kernels. The
geometry of a launch is computed once per shape (``_geometry``, cached); each call adds only
its tensors' addresses.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
import torch

from ._memory_format import alloc_grad_input, alloc_grad_kernel, alloc_output, dense_kernel, memory_format_of

__all__ = [
    "KINDS",
    "NCHW_TILES",
    "NHWC_MAX_K",
    "NHWC_PATCH",
    "NHWC_SLOTS",
    "PATHS",
    "THREADS",
    "TYPE_NAMES",
    "Launch",
    "kernel_name",
    "name_expressions",
    "nchw_tile",
    "nhwc_groups_per_block",
    "nhwc_shared_bytes",
    "nhwc_threads_per_item",
    "plan_backward_input",
    "plan_backward_kernel",
    "plan_forward",
]

TYPE_NAMES = {torch.float32: "float", torch.float64: "double", torch.float16: "half_t", torch.bfloat16: "bf16_t"}
KINDS = ("fwd", "bwd_input", "bwd_kernel")
# Kernel families: 'nchw'; 'nhwc', 128-bit accesses and shared-memory windows, for 16 channels per
# group; 'nhwc_scalar', any group width, alignment or window.
PATHS = ("nchw", "nhwc", "nhwc_scalar")
# As in involution.cu: the block size, the NCHW tile shapes (width, height), widest first, and for
# the NHWC vector kernels the 16-byte channel slices per block, the side of their pixel patches
# and the largest window they are compiled for.
THREADS = 256
NCHW_TILES = ((32, 8), (16, 8), (8, 8))
NHWC_SLOTS = 8
NHWC_PATCH = 8
NHWC_MAX_K = 11
_MAX_BLOCKS = 1 << 20  # grid-stride kernels cover the rest with their loop
_INT_MAX = 2**31 - 1
# Shared memory a block may use where no device says: sm_90's opt-in maximum (plans the host
# emulation runs; a CUDA tensor's device is asked).
_DEFAULT_MAX_SHARED = 227 * 1024


class Launch(NamedTuple):
    """One kernel launch: ``name`` is a name expression of ``involution.cu``."""

    name: str
    module: tuple  # (dtype, K, stride, dilation): the RawModule that holds the kernel
    grid: int
    args: tuple  # numpy scalars in the kernel's parameter order (pointers as uint64)
    keep: tuple  # tensors the pointers refer to, alive until the launch is queued
    smem: int = 0  # dynamic shared memory per block, bytes


def kernel_name(kind: str, path: str, dtype: torch.dtype, k: int, stride: int, dilation: int) -> str:
    return f"involution_{kind}_{path}<{TYPE_NAMES[dtype]}, {k}, {stride}, {dilation}>"


def name_expressions(dtype: torch.dtype, k: int, stride: int, dilation: int) -> list[str]:
    """The kernels of one module: every kind and path for one (dtype, K, S, D); the NHWC vector
    kernels only where they can run (K <= NHWC_MAX_K)."""
    paths = [p for p in PATHS if p != "nhwc" or k <= NHWC_MAX_K]
    return [kernel_name(kind, path, dtype, k, stride, dilation) for path in paths for kind in KINDS]


def nchw_tile(width: int) -> tuple[int, int]:
    """The narrowest NCHW tile (width, height) covering ``width`` pixels, else the widest tile.

    A 7x7 map in a 32x8 tile keeps 49 of 256 threads busy; in 8x8 tiles, four planes per
    block, 49 of 64.
    """
    for tw, th in reversed(NCHW_TILES):
        if width <= tw:
            return tw, th
    return NCHW_TILES[0]


def nhwc_groups_per_block(tpi: int, groups: int) -> int:
    """Groups side by side in an NHWC vector block: the most, a power of two dividing ``groups``,
    whose ``tpi`` 16-byte slices each fit the block's NHWC_SLOTS (4 for bf16/fp16, 2 for fp32); the
    block's slots then hold NHWC_SLOTS / (tpi * groups per block) patches of NHWC_PATCH^2 pixels."""
    gb = NHWC_SLOTS // tpi
    while groups % gb:
        gb //= 2
    return gb


def nhwc_threads_per_item(channels: int, groups: int, k: int, dtype: torch.dtype,
                          tensors: tuple[torch.Tensor, ...]) -> int | None:
    """16-byte slices per group of the NHWC vector kernels (``dtype.itemsize``), or None when
    they cannot run and the scalar kernels take the case.

    The vector kernels are compiled for 16 channels per group (RedNet's), 16-byte aligned
    tensors and K <= NHWC_MAX_K; a block's kernel rows must be whole 32-bit words
    (``_launch`` checks that and the shared memory, which depend on the pass).
    """
    return _nhwc_slices(channels, groups, k, dtype, not any(t.data_ptr() % 16 for t in tensors))


def _nhwc_slices(channels: int, groups: int, k: int, dtype: torch.dtype, aligned: bool) -> int | None:
    """``nhwc_threads_per_item`` given whether every tensor is 16-byte aligned."""
    if not aligned or groups == 0 or channels != 16 * groups or k > NHWC_MAX_K:
        return None
    return dtype.itemsize


def nhwc_shared_bytes(kind: str, k: int, stride: int, dilation: int) -> int:
    """Dynamic shared memory of an NHWC vector block (involution.cu's InWindow / OutWindow): a
    window plane of 16-byte units per slot (odd-sized), and for fwd and bwd_kernel the block's
    kernel rows, 512 * K*K bytes."""
    if kind == "bwd_input":  # grad_y rows an 8x8 patch of input pixels reads
        span = (k - 1) * dilation
        side = NHWC_PATCH + span if stride == 1 else (NHWC_PATCH - 1 + span) // stride + 2
        return NHWC_SLOTS * (side * side | 1) * 16
    side = (NHWC_PATCH - 1) * stride + (k - 1) * dilation + 1
    return NHWC_SLOTS * (side * side | 1) * 16 + 512 * k * k


@functools.cache
def _max_shared_cuda(index: int) -> int:
    return torch.cuda.get_device_properties(index).shared_memory_per_block_optin


def max_shared_bytes(device: torch.device) -> int:
    """The most dynamic shared memory a block may use on ``device``."""
    if device.type != "cuda":
        return _DEFAULT_MAX_SHARED
    return _max_shared_cuda(torch.cuda.current_device() if device.index is None else device.index)


# ----------------------------------------------------------------------------------------
# Launch plans.


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class _Geometry(NamedTuple):
    """What a launch needs besides its tensors' addresses: the same for every call of a shape."""

    name: str
    module: tuple
    grid: int
    tail: tuple  # the arguments after the three pointers, numpy scalars
    smem: int


# Planning costs a few microseconds of Python per pass, a training step runs three passes per
# involution layer (17 in RedNet-50), and a run meets a handful of shapes: each is planned once.
# Bounded, as a run with variable input sizes (detection) meets many.
@functools.lru_cache(maxsize=1024)
def _geometry(kind: str, dtype: torch.dtype, x_shape: tuple, kernel_shape: tuple, stride: int, padding: int,
              dilation: int, memory_format: str, aligned: bool, max_shared: int) -> _Geometry:
    """The launch geometry of one pass, from everything it depends on but the data pointers.

    The inputs are dense in ``memory_format`` (the plans densify them), so the shapes and the
    format stand for their strides; ``aligned``: every pointer is 16-byte aligned (the NHWC
    vector kernels' condition); ``max_shared``: the device's dynamic shared memory per block.
    """
    b, c, h, w = x_shape
    _, g, k, _, ho, wo = kernel_shape
    module = (dtype, k, stride, dilation)
    sizes = tuple(np.int32(v) for v in (c, h, w, g, ho, wo, padding))
    # grad_x runs over input pixels, the other passes over output pixels.
    rows, cols = (h, w) if kind == "bwd_input" else (ho, wo)
    if memory_format == "nchw":
        if max(h * w, ho * wo) > _INT_MAX:
            raise ValueError(f"involution: a {h}x{w} plane is too large for the kernels' 32-bit plane offsets")
        tw, th = nchw_tile(cols)
        tiles_w = _cdiv(cols, tw)
        tiles = _cdiv(rows, th) * tiles_w
        planes = b * g
        grid = tiles * _cdiv(planes, THREADS // (tw * th))
        if max(grid, planes) > _INT_MAX:
            raise ValueError(f"involution: grid of {grid} blocks ({planes} planes) is too large for one launch")
        geometry = (tw, th, tiles_w, tiles, planes)
        return _Geometry(kernel_name(kind, "nchw", dtype, k, stride, dilation), module, grid,
                         sizes + tuple(np.int32(v) for v in geometry), 0)
    items = b * rows * cols * g  # (pixel, group) rows, in storage order
    tpi = _nhwc_slices(c, g, k, dtype, aligned)
    if tpi is not None:
        gb = nhwc_groups_per_block(tpi, g)
        size, kk = dtype.itemsize, k * k
        smem = nhwc_shared_bytes(kind, k, stride, dilation)
        # Patches tile the map the pass writes: output pixels, or input pixels for grad_input.
        tiles_w = _cdiv(cols, NHWC_PATCH)
        tiles = _cdiv(rows, NHWC_PATCH) * tiles_w
        ptiles = _cdiv(tiles, NHWC_SLOTS // (gb * tpi))
        grid = b * (g // gb) * ptiles
        if ((gb * kk * size) % 4 == 0 and (g * kk * size) % 4 == 0  # kernel rows in 32-bit words
                and smem <= max_shared and (kind != "bwd_input" or stride <= 2)
                and max(h * w * c, ho * wo * c, ho * wo * g * kk, grid) <= _INT_MAX):  # 32-bit offsets in an image
            return _Geometry(kernel_name(kind, "nhwc", dtype, k, stride, dilation), module, grid,
                             sizes + tuple(np.int32(v) for v in (gb, tiles_w, tiles, ptiles)), smem)
    grid = min(_cdiv(items, THREADS), _MAX_BLOCKS)
    return _Geometry(kernel_name(kind, "nhwc_scalar", dtype, k, stride, dilation), module, grid,
                     sizes + (np.int64(items),), 0)


def _launch(kind: str, ins: tuple[torch.Tensor, torch.Tensor], out: torch.Tensor, x_shape, kernel_shape,
            stride: int, padding: int, dilation: int, memory_format: str) -> Launch:
    # Raw pointers address the storage as laid out by the plan; the NHWC grad_w output is a
    # permuted view whose storage is (B, Ho, Wo, G, K, K) contiguous, which data_ptr() still is.
    # They change from call to call, so they stay out of the cached geometry.
    ptrs = (ins[0].data_ptr(), ins[1].data_ptr(), out.data_ptr())
    geo = _geometry(kind, out.dtype, tuple(x_shape), tuple(kernel_shape), stride, padding, dilation, memory_format,
                    not (ptrs[0] | ptrs[1] | ptrs[2]) % 16, max_shared_bytes(out.device))
    return Launch(geo.name, geo.module, geo.grid, tuple(np.uint64(p) for p in ptrs) + geo.tail, ins, geo.smem)


def plan_forward(x: torch.Tensor, kernel: torch.Tensor, stride: int, padding: int,
                 dilation: int) -> tuple[torch.Tensor, Launch | None]:
    y = alloc_output(x, kernel)
    if y.numel() == 0:
        return y, None
    fmt = memory_format_of(x)
    if fmt == "nchw":
        ins = (x.contiguous(), kernel.contiguous())
    else:
        ins = (x.contiguous(memory_format=torch.channels_last), dense_kernel(kernel, "nhwc"))
    return y, _launch("fwd", ins, y, x.shape, kernel.shape, stride, padding, dilation, fmt)


def plan_backward_input(grad_out: torch.Tensor, x: torch.Tensor, kernel: torch.Tensor, stride: int, padding: int,
                        dilation: int) -> tuple[torch.Tensor, Launch | None]:
    gx = alloc_grad_input(x)
    if gx.numel() == 0:
        return gx, None
    if grad_out.numel() == 0:  # no output pixels: nothing reads x
        return gx.zero_(), None
    fmt = memory_format_of(x)
    if fmt == "nchw":
        ins = (grad_out.contiguous(), kernel.contiguous())
    else:
        ins = (grad_out.contiguous(memory_format=torch.channels_last), dense_kernel(kernel, "nhwc"))
    return gx, _launch("bwd_input", ins, gx, x.shape, kernel.shape, stride, padding, dilation, fmt)


def plan_backward_kernel(grad_out: torch.Tensor, x: torch.Tensor, kernel: torch.Tensor, stride: int, padding: int,
                         dilation: int) -> tuple[torch.Tensor, Launch | None]:
    gw = alloc_grad_kernel(x, kernel)
    if gw.numel() == 0:
        return gw, None
    if x.shape[1] == 0:  # no channels to sum over
        return gw.zero_(), None
    fmt = memory_format_of(x)
    if fmt == "nchw":
        ins = (grad_out.contiguous(), x.contiguous())
    else:
        ins = (grad_out.contiguous(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last))
    return gw, _launch("bwd_kernel", ins, gw, x.shape, kernel.shape, stride, padding, dilation, fmt)
