"""Launch plans for the CUDA involution kernels: geometry, arguments, outputs.

Pure PyTorch and numpy, no CuPy: outputs are allocated, and inputs densified, by
``_memory_format`` (as the fake functions and the CPU kernels do), ``_cupy.launch``
executes the plans, and tests run the same plans on a host emulation of the kernels.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from ._memory_format import alloc_grad_input, alloc_grad_kernel, alloc_output, dense_kernel, memory_format_of

__all__ = [
    "KINDS",
    "NCHW_TILES",
    "NHWC_MAX_STAGED_K",
    "NHWC_PATCH_W",
    "PATHS",
    "THREADS",
    "TYPE_NAMES",
    "Launch",
    "kernel_name",
    "name_expressions",
    "nchw_tile",
    "nhwc_groups_per_block",
    "nhwc_threads_per_item",
    "plan_backward_input",
    "plan_backward_kernel",
    "plan_forward",
]

TYPE_NAMES = {torch.float32: "float", torch.float64: "double", torch.float16: "half_t", torch.bfloat16: "bf16_t"}
KINDS = ("fwd", "bwd_input", "bwd_kernel")
# Kernel families: 'nchw'; 'nhwc', 128-bit accesses, for group widths of 16 bytes times a power of
# two; 'nhwc_scalar', any group width, alignment or window.
PATHS = ("nchw", "nhwc", "nhwc_scalar")
# As in involution.cu: the block size, the NCHW tile shapes (width, height), widest first, the
# largest window whose kernel rows the NHWC vector kernels stage in shared memory, and the
# width of their pixel patches.
THREADS = 256
NCHW_TILES = ((32, 8), (16, 8), (8, 8))
NHWC_MAX_STAGED_K = 11
NHWC_PATCH_W = 8
_MAX_BLOCKS = 1 << 20  # grid-stride kernels cover the rest with their loop
_INT_MAX = 2**31 - 1


class Launch(NamedTuple):
    """One kernel launch: ``name`` is a name expression of ``involution.cu``."""

    name: str
    module: tuple  # (dtype, K, stride, dilation): the RawModule that holds the kernel
    grid: int
    args: tuple  # numpy scalars in the kernel's parameter order (pointers as uint64)
    keep: tuple  # tensors the pointers refer to, alive until the launch is queued


def kernel_name(kind: str, path: str, dtype: torch.dtype, k: int, stride: int, dilation: int) -> str:
    return f"involution_{kind}_{path}<{TYPE_NAMES[dtype]}, {k}, {stride}, {dilation}>"


def name_expressions(dtype: torch.dtype, k: int, stride: int, dilation: int) -> list[str]:
    """The kernels of one module: every kind and path for one (dtype, K, S, D); the NHWC vector
    kernels only where they can run (K <= NHWC_MAX_STAGED_K)."""
    paths = [p for p in PATHS if p != "nhwc" or k <= NHWC_MAX_STAGED_K]
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
    """Groups side by side in an NHWC vector block: two for bf16/fp16 at C/G = 16 (when G is
    even), so a block is an 8x8 patch, else one; the patch is NHWC_PATCH_W pixels wide and
    THREADS / (tpi * groups_per_block * NHWC_PATCH_W) high."""
    gb = max(1, 4 // tpi)
    return gb if groups % gb == 0 else 1


def nhwc_threads_per_item(channels: int, groups: int, k: int, dtype: torch.dtype,
                          tensors: tuple[torch.Tensor, ...]) -> int | None:
    """Threads per (pixel, group) of the NHWC vector kernels (16 bytes of channels each), or
    None when they cannot run: the scalar kernels take the case.

    The vector kernels need 16-byte aligned tensors, a group width of 16 bytes times a power of
    two (the item's threads are lanes of one warp that sum by xor shuffles), at least 16
    channels per group (so a block's kernel rows fit its shared-memory chunk) and K <=
    NHWC_MAX_STAGED_K.
    """
    cg, size = channels // groups, dtype.itemsize
    if cg < 16 or (cg * size) % 16 or k > NHWC_MAX_STAGED_K:
        return None
    tpi = cg * size // 16
    if tpi > 32 or tpi & (tpi - 1) or any(t.data_ptr() % 16 for t in tensors):
        return None
    return tpi


# ----------------------------------------------------------------------------------------
# Launch plans.


def _ptr(t: torch.Tensor) -> np.uint64:
    return np.uint64(t.data_ptr())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _launch(kind: str, ins: tuple[torch.Tensor, torch.Tensor], out: torch.Tensor, x_shape, kernel_shape,
            stride: int, padding: int, dilation: int, memory_format: str) -> Launch:
    b, c, h, w = x_shape
    _, g, k, _, ho, wo = kernel_shape
    module = (out.dtype, k, stride, dilation)
    # Raw pointers address the storage as laid out by the plan; the NHWC grad_w output is a
    # permuted view whose storage is (B, Ho, Wo, G, K, K) contiguous, which data_ptr() still is.
    args = (_ptr(ins[0]), _ptr(ins[1]), _ptr(out)) + tuple(np.int32(v) for v in (c, h, w, g, ho, wo, padding))
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
        return Launch(kernel_name(kind, "nchw", out.dtype, k, stride, dilation), module, grid,
                      args + tuple(np.int32(v) for v in geometry), ins)
    items = b * rows * cols * g  # (pixel, group) rows, in storage order
    tpi = nhwc_threads_per_item(c, g, k, out.dtype, (*ins, out))
    if tpi is not None:
        gb = nhwc_groups_per_block(tpi, g)
        ph = THREADS // (tpi * gb * NHWC_PATCH_W)
        tiles_w = _cdiv(cols, NHWC_PATCH_W)
        tiles = _cdiv(rows, ph) * tiles_w
        grid = b * (g // gb) * tiles
        if grid <= _INT_MAX:
            return Launch(kernel_name(kind, "nhwc", out.dtype, k, stride, dilation), module, grid,
                          args + tuple(np.int32(v) for v in (tpi, gb, tiles_w, tiles, g // gb)), ins)
    grid = min(_cdiv(items, THREADS), _MAX_BLOCKS)
    return Launch(kernel_name(kind, "nhwc_scalar", out.dtype, k, stride, dilation), module, grid,
                  args + (np.int64(items),), ins)


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
