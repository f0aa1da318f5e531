"""Pure-PyTorch involution: the tap-accumulating reference and the unfold formulation.

The reference runs everywhere (CPU, CUDA, any float dtype) and is what the CUDA
kernels are tested against. It loops over the K*K taps and accumulates
``kernel[tap] * shifted(x)`` into the output, so its memory stays O(input + output)
instead of the O(K*K * input) tensor that ``nn.Unfold`` materialises.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["involution_reference", "involution_unfold"]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half types accumulate in float32 like the CUDA kernels, so both agree on the
    # rounding of the sum and only differ by the final cast.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _tap(t: torch.Tensor, u: int, v: int, size: tuple[int, int], stride: int, dilation: int):
    """View of the padded input ``t`` (..., Hp, Wp) read by tap (u, v) for every output pixel."""
    ho, wo = size
    r0, c0 = u * dilation, v * dilation
    return t[..., r0 : r0 + (ho - 1) * stride + 1 : stride, c0 : c0 + (wo - 1) * stride + 1 : stride]


def _format(t: torch.Tensor) -> torch.memory_format:
    cl = t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


def _compute_format(c: int, wo: int, stride: int) -> torch.memory_format:
    # Each tap is one elementwise op whose speed depends on its innermost contiguous run:
    # Wo pixels in NCHW (none at all when stride > 1), C channels in channels_last. On
    # RedNet-50's shapes (CPU, one thread) channels_last is 1.2-4x faster from layer3 on
    # and at every stride-2 block, and 2x slower at the stem, layer1 and layer2.
    return torch.channels_last if stride > 1 or c >= 8 * wo else torch.contiguous_format


def _zeros(shape, dtype: torch.dtype, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype, device=like.device).contiguous(memory_format=_format(like))


class _InvolutionReference(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel, stride, padding, dilation):
        b, c, h, w = x.shape
        _, g, k, _, ho, wo = kernel.shape
        acc = _acc_dtype(x.dtype)
        in_format = _format(x)
        ctx.save_for_backward(x, kernel)  # the input itself, so double backward reaches it
        x = x.contiguous(memory_format=_compute_format(c, wo, stride))
        xp = F.pad(x, (padding, padding, padding, padding))  # keeps x's memory format
        xg = xp.view(b, g, c // g, *xp.shape[-2:])  # (B, G, C/G, Hp, Wp)
        out = _zeros((b, c, ho, wo), acc, like=x)
        og = out.view(b, g, c // g, ho, wo)  # (B, G, C/G, Ho, Wo), shares storage with out
        for u in range(k):
            for v in range(k):
                # kernel[:, :, u, v]: (B, G, Ho, Wo) -> broadcast over the C/G channels of its group
                og.addcmul_(_tap(xg, u, v, (ho, wo), stride, dilation), kernel[:, :, u, v].unsqueeze(2))
        ctx.conf = (stride, padding, dilation, in_format)
        return out.to(x.dtype).contiguous(memory_format=in_format)

    @staticmethod
    def backward(ctx, grad_out):
        x, kernel = ctx.saved_tensors
        stride, padding, dilation, in_format = ctx.conf
        b, c, h, w = x.shape
        _, g, k, _, ho, wo = kernel.shape
        acc = _acc_dtype(x.dtype)
        x = x.contiguous(memory_format=_compute_format(c, wo, stride))
        go = grad_out.to(acc).contiguous(memory_format=_format(x)).view(b, g, c // g, ho, wo)  # (B, G, C/G, Ho, Wo)
        grad_x = grad_kernel = None
        if ctx.needs_input_grad[0]:
            hp, wp = h + 2 * padding, w + 2 * padding
            gxp = _zeros((b, c, hp, wp), acc, like=x)
            gxg = gxp.view(b, g, c // g, hp, wp)
            for u in range(k):
                for v in range(k):
                    _tap(gxg, u, v, (ho, wo), stride, dilation).addcmul_(go, kernel[:, :, u, v].unsqueeze(2))
            grad_x = gxp[..., padding : padding + h, padding : padding + w]  # (B, C, H, W) view, padding cut
            grad_x = grad_x.to(x.dtype).contiguous(memory_format=in_format)
        if ctx.needs_input_grad[1]:
            xg = F.pad(x, (padding, padding, padding, padding)).view(b, g, c // g, h + 2 * padding, w + 2 * padding)
            grad_kernel = torch.empty((b, g, k, k, ho, wo), dtype=kernel.dtype, device=kernel.device)
            for u in range(k):
                for v in range(k):
                    # Sum over the C/G channels that share this kernel value.
                    grad_kernel[:, :, u, v] = (go * _tap(xg, u, v, (ho, wo), stride, dilation)).sum(2)
        return grad_x, grad_kernel, None, None, None


def involution_reference(x: torch.Tensor, kernel: torch.Tensor, stride: int, padding: int,
                         dilation: int) -> torch.Tensor:
    """Involution by accumulation over taps. Inputs are assumed validated."""
    return _InvolutionReference.apply(x, kernel, stride, padding, dilation)


def involution_unfold(x: torch.Tensor, kernel: torch.Tensor, stride: int, padding: int, dilation: int) -> torch.Tensor:
    """The formulation of the original release: materialise all K*K taps with unfold.

    Kept as a second test oracle and as the baseline of ``tools/benchmark.py``.
    """
    b, c, h, w = x.shape
    _, g, k, _, ho, wo = kernel.shape
    cols = F.unfold(x, k, dilation=dilation, padding=padding, stride=stride)  # (B, C*K*K, Ho*Wo)
    cols = cols.view(b, g, c // g, k * k, ho, wo)
    out = (kernel.reshape(b, g, 1, k * k, ho, wo) * cols).sum(dim=3)  # (B, G, C/G, Ho, Wo)
    return out.reshape(b, c, ho, wo)
