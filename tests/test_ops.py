"""The involution operator's front door and reference backend (CPU)."""
import logging

import pytest
import torch

from rednet.ops import (
    can_use_native_kernel,
    involution,
    involution_output_size,
    involution_reference,
    involution_unfold,
    select_backend,
)

# (B, C, G, H, W, K, stride, dilation): odd sizes, stride 2, dilation 2, K = 1..7, G = 1 and G = C.
SHAPES = [
    (2, 4, 1, 7, 9, 3, 1, 1),
    (1, 6, 6, 9, 7, 3, 2, 1),
    (2, 8, 2, 11, 10, 5, 1, 2),
    (1, 4, 4, 13, 9, 7, 2, 1),
    (2, 6, 3, 5, 6, 1, 1, 1),
    (1, 8, 1, 9, 11, 7, 1, 1),
    (2, 4, 2, 10, 9, 5, 2, 2),
]


def _inputs(b, c, g, h, w, k, s, d, dtype=torch.float64, pad=None):
    p = d * (k - 1) // 2 if pad is None else pad
    ho, wo = involution_output_size(h, k, s, p, d), involution_output_size(w, k, s, p, d)
    return torch.randn(b, c, h, w, dtype=dtype), torch.randn(b, g, k, k, ho, wo, dtype=dtype), p


def naive_involution(x, kernel, s, p, d):
    """REFERENCE.md's formula, one output pixel and tap at a time."""
    b, c, h, w = x.shape
    _, g, k, _, ho, wo = kernel.shape
    group_of = torch.arange(c) // (c // g)  # g(c)
    y = torch.zeros(b, c, ho, wo, dtype=x.dtype)
    for i in range(ho):
        for j in range(wo):
            for u in range(k):
                for v in range(k):
                    r, q = i * s - p + u * d, j * s - p + v * d
                    if 0 <= r < h and 0 <= q < w:
                        y[:, :, i, j] += kernel[:, group_of, u, v, i, j] * x[:, :, r, q]
    return y


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_reference_matches_naive_loop(shape):
    x, k, p = _inputs(*shape)
    s, d = shape[6], shape[7]
    torch.testing.assert_close(involution(x, k, s, None, d), naive_involution(x, k, s, p, d), rtol=1e-12, atol=1e-12)


def test_explicit_padding_matches_naive_loop():
    x, k, p = _inputs(2, 4, 2, 8, 9, 3, 2, 1, pad=0)
    torch.testing.assert_close(involution(x, k, 2, 0), naive_involution(x, k, 2, 0, 1))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_reference_matches_unfold_with_gradients(shape):
    x, k, p = _inputs(*shape)
    s, d = shape[6], shape[7]
    x.requires_grad_(True)
    k.requires_grad_(True)
    y, y2 = involution(x, k, s, p, d), involution_unfold(x, k, s, p, d)
    torch.testing.assert_close(y, y2)
    go = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, (x, k), go), torch.autograd.grad(y2, (x, k), go)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("shape", [(1, 4, 2, 5, 6, 3, 1, 1), (2, 2, 1, 6, 5, 3, 2, 2), (1, 2, 2, 5, 5, 5, 2, 1)], ids=str)
def test_gradcheck(shape):
    x, k, p = _inputs(*shape)
    s, d = shape[6], shape[7]
    x.requires_grad_(True)
    k.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: involution(a, b, s, p, d), (x, k))
    assert torch.autograd.gradgradcheck(lambda a, b: involution(a, b, s, p, d), (x, k))


def test_channels_last_in_same_values_out():
    x, k, p = _inputs(2, 32, 2, 9, 9, 7, 1, 1, dtype=torch.float32)
    x_cl = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    x = x.requires_grad_(True)
    y, y_cl = involution(x, k), involution(x_cl, k)
    assert y_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y_cl, y, rtol=0, atol=0)
    go = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y_cl, x_cl, go)[0], torch.autograd.grad(y, x, go)[0])


def test_non_contiguous_inputs():
    x, k, p = _inputs(2, 8, 2, 9, 16, 3, 1, 1)
    x_nc = torch.randn(2, 8, 9, 32, dtype=torch.float64)[..., ::2]
    k_big = torch.randn(2, 2, 3, 3, 9, 16, dtype=torch.float64)
    assert not x_nc.is_contiguous()
    torch.testing.assert_close(involution(x_nc, k_big), naive_involution(x_nc, k_big, 1, 1, 1))


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_half_dtypes_within_tolerance(dtype, tol):
    x, k, p = _inputs(2, 16, 1, 9, 9, 7, 2, 1, dtype=torch.float32)
    xh, kh = x.to(dtype).requires_grad_(True), k.to(dtype).requires_grad_(True)
    y = involution(xh, kh, 2)
    assert y.dtype == dtype
    ref = involution(xh.detach().float(), kh.detach().float(), 2)
    assert ((y.float() - ref).norm() / ref.norm()).item() < tol
    gx, gk = torch.autograd.grad(y.float().square().sum(), (xh, kh))
    assert gx.dtype == dtype and gk.dtype == dtype and torch.isfinite(gx).all() and torch.isfinite(gk).all()


def test_reference_saves_no_unfolded_tensor():
    # Memory: autograd keeps only x and the kernel, never a (B, C, K*K, Ho, Wo) tensor.
    x, k, _ = _inputs(2, 32, 2, 14, 14, 7, 1, 1, dtype=torch.float32)
    x.requires_grad_(True)
    k.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t):
        involution_reference(x, k, 1, 3, 1)
    assert sum(saved) <= x.numel() * 4 + k.numel() * 4
    unfold_saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: unfold_saved.append(t.numel() * t.element_size()) or t, lambda t: t):
        involution_unfold(x, k, 1, 3, 1)
    assert sum(unfold_saved) > 10 * sum(saved)  # the formulation we replace does blow up


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: (torch.randn(2, 4, 5), torch.randn(2, 1, 3, 3, 5, 5)), "x must be 4-D"),
        (lambda: (torch.randn(2, 4, 5, 5), torch.randn(2, 9, 5, 5)), "kernel must be 6-D"),
        (lambda: (torch.randn(2, 4, 5, 5), torch.randn(3, 1, 3, 3, 5, 5)), "batch sizes differ"),
        (lambda: (torch.randn(2, 4, 5, 5), torch.randn(2, 1, 3, 5, 5, 5)), "must be square"),
        (lambda: (torch.randn(2, 6, 5, 5), torch.randn(2, 4, 3, 3, 5, 5)), "divisible by the number of groups"),
        (lambda: (torch.randn(2, 4, 5, 5), torch.randn(2, 1, 3, 3, 4, 5)), "does not match the output size 5x5"),
        (lambda: (torch.randn(2, 4, 5, 5), torch.randn(2, 1, 3, 3, 5, 5, dtype=torch.float64)), "cast one"),
        (lambda: (torch.randint(0, 3, (2, 4, 5, 5)), torch.randint(0, 3, (2, 1, 3, 3, 5, 5))), "not supported"),
    ],
)
def test_validation_errors_say_what_to_fix(make, match):
    x, k = make()
    with pytest.raises(ValueError, match=match):
        involution(x, k)


def test_validation_of_stride_and_device():
    x, k, _ = _inputs(1, 4, 1, 5, 5, 3, 1, 1)
    with pytest.raises(ValueError, match="stride must be an int >= 1"):
        involution(x, k, stride=0)
    with pytest.raises(ValueError, match="padding must be an int >= 0"):
        involution(x, k, padding=-1)
    with pytest.raises(ValueError, match="input 2x2 is too small for K=5"):
        involution(torch.randn(1, 4, 2, 2), torch.randn(1, 1, 5, 5, 1, 1), padding=0)
    with pytest.raises(ValueError, match="move them to one device"):
        involution(x, k.to("meta"))


def test_backend_selection(monkeypatch, caplog):
    x, k, _ = _inputs(1, 4, 1, 5, 5, 3, 1, 1)
    monkeypatch.setenv("REDNET_INVOLUTION_BACKEND", "reference")
    assert select_backend(x) == "reference"
    monkeypatch.setenv("REDNET_INVOLUTION_BACKEND", "cupy")
    with pytest.raises(RuntimeError, match="'cupy' was forced but cannot run: input is on cpu"):
        involution(x, k)
    monkeypatch.setenv("REDNET_INVOLUTION_BACKEND", "fast")
    with pytest.raises(ValueError, match="unknown involution backend 'fast'"):
        involution(x, k)
    monkeypatch.delenv("REDNET_INVOLUTION_BACKEND")
    # auto sends CPU tensors to the native kernel when it is built, and says why when it declines.
    assert select_backend(x) == ("native" if can_use_native_kernel(x)[0] else "reference")
    with caplog.at_level(logging.DEBUG, logger="rednet.ops"):
        assert select_backend(x.half()) == "reference"
    assert "native CPU kernel declined" in caplog.text and "float16" in caplog.text
