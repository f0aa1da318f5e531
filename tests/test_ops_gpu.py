"""The real CUDA kernels on a GPU (``gpu`` marker; skipped without one), against the reference."""
from __future__ import annotations

import pytest
import torch

from rednet.ops import _cupy, _plan, involution, involution_reference

cuda = pytest.mark.gpu


def _cuda_ok():
    ok, why = _cupy.can_run_on("cuda", None, torch.float32)
    if not ok:
        pytest.skip(why)


def _rand_case(b, c, g, h, w, k, s, d, pad=None, dtype=torch.float64, memory_format="nchw", device="cuda"):
    pad = d * (k - 1) // 2 if pad is None else pad
    ho, wo = ((n + 2 * pad - d * (k - 1) - 1) // s + 1 for n in (h, w))
    fmt = torch.channels_last if memory_format == "nhwc" else torch.contiguous_format
    x = torch.randn(b, c, h, w, device=device, dtype=dtype).contiguous(memory_format=fmt)
    kernel = torch.randn(b, g * k * k, ho, wo, device=device, dtype=dtype).contiguous(memory_format=fmt)
    return x, kernel.view(b, g, k, k, ho, wo), pad


GPU_SHAPES = [  # (B, C, G, H, W, K, S, D, pad)
    (1, 16, 1, 7, 9, 3, 1, 1, None),
    (2, 32, 2, 57, 31, 7, 1, 1, None),
    (3, 48, 3, 29, 45, 7, 2, 1, None),
    (2, 64, 4, 33, 17, 5, 1, 2, None),
    (1, 24, 8, 19, 23, 3, 2, 2, 0),
    (2, 12, 4, 13, 11, 11, 2, 3, None),   # no smem tile (forward, grad_kernel)
    (1, 8, 2, 9, 40, 15, 1, 3, None),     # no smem tile (grad_input)
    (64, 32, 2, 14, 14, 7, 1, 1, None),   # large batch
    (2, 16, 16, 5, 5, 1, 2, 1, 0),        # K = 1, one channel per group
]


@cuda
@pytest.mark.parametrize("memory_format", ["nchw", "nhwc"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_gpu_float64_matches_reference(shape, memory_format):
    _cuda_ok()
    b, c, g, h, w, k, s, d, pad = shape
    x, kernel, pad = _rand_case(b, c, g, h, w, k, s, d, pad, memory_format=memory_format)
    grad_out = torch.randn(b, c, kernel.shape[-2], kernel.shape[-1], device="cuda", dtype=torch.float64)
    x.requires_grad_()
    kernel.requires_grad_()
    y = involution(x, kernel, s, pad, d, backend="cupy")
    gx, gw = torch.autograd.grad(y, (x, kernel), grad_out)
    ry = involution(x, kernel, s, pad, d, backend="reference")
    rgx, rgw = torch.autograd.grad(ry, (x, kernel), grad_out)
    torch.testing.assert_close((y, gx, gw), (ry, rgx, rgw), rtol=1e-10, atol=1e-10)
    fmt = torch.channels_last if memory_format == "nhwc" else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt) and gx.is_contiguous(memory_format=fmt)


@cuda
@pytest.mark.parametrize("memory_format", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k,s", [(3, 1), (7, 1), (7, 2)])
def test_gpu_low_precision_within_dtype_tolerance(dtype, memory_format, k, s):
    _cuda_ok()
    x, kernel, pad = _rand_case(4, 64, 4, 28, 28, k, s, 1, dtype=dtype, memory_format=memory_format)
    x.requires_grad_()
    kernel.requires_grad_()
    grad_out = torch.randn(4, 64, *kernel.shape[-2:], device="cuda", dtype=dtype)
    y = involution(x, kernel, s, pad, 1, backend="cupy")
    gx, gw = torch.autograd.grad(y, (x, kernel), grad_out)
    assert y.dtype == gx.dtype == gw.dtype == dtype
    xr, kr = x.detach().float().requires_grad_(), kernel.detach().float().requires_grad_()
    ry = involution_reference(xr, kr, s, pad, 1)
    rgx, rgw = torch.autograd.grad(ry, (xr, kr), grad_out.float())
    # fp32 accumulation: the only error is the inputs' and the final rounding, relative to the sum's scale.
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for got, ref in ((y, ry), (gx, rgx), (gw, rgw)):
        torch.testing.assert_close(got.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@cuda
def test_gpu_non_contiguous_inputs():
    _cuda_ok()
    x_full, kernel, pad = _rand_case(2, 64, 2, 20, 20, 3, 1, 1)
    x = x_full[:, ::2]  # (2, 32, 20, 20), channel stride 2: neither memory format
    k_t = torch.randn(2, 2, 3, 3, 20, 20, device="cuda", dtype=torch.float64).transpose(-1, -2)
    for xx in (x, x_full.transpose(2, 3)[:, :32], x_full.contiguous(memory_format=torch.channels_last)[:, 16:48]):
        for kk in (k_t, k_t.contiguous()):
            torch.testing.assert_close(involution(xx, kk, backend="cupy"), involution_reference(xx, kk, 1, 1, 1))


@cuda
@pytest.mark.parametrize("memory_format", ["nchw", "nhwc"])
def test_gpu_opcheck(memory_format):
    _cuda_ok()
    from rednet.ops import _custom_op  # noqa: F401

    x, kernel, pad = _rand_case(2, 32, 2, 13, 15, 7, 2, 1, memory_format=memory_format)
    torch.library.opcheck(torch.ops.rednet.involution.default, (x.requires_grad_(), kernel.requires_grad_(), 2, pad, 1))
    xf, kf, _ = _rand_case(2, 32, 2, 13, 15, 3, 1, 1, dtype=torch.float32, memory_format=memory_format)
    torch.library.opcheck(torch.ops.rednet.involution.default, (xf.requires_grad_(), kf.requires_grad_(), 1, 1, 1))


@cuda
def test_gpu_no_host_sync_current_stream_and_device():
    _cuda_ok()
    x, kernel, pad = _rand_case(2, 32, 2, 28, 28, 7, 1, 1, dtype=torch.float32)
    x.requires_grad_()
    ref = involution_reference(x.detach(), kernel, 1, pad, 1)
    involution(x, kernel, backend="cupy")  # compile outside the checked region
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.stream(side):
            y = involution(x, kernel, backend="cupy")
            y.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(y, ref)
    if torch.cuda.device_count() > 1:
        x1, k1 = x.detach().to("cuda:1"), kernel.to("cuda:1")
        torch.testing.assert_close(involution(x1, k1, backend="cupy").cpu(), ref.cpu())


@cuda
@pytest.mark.parametrize("channels_last", [False, True])
def test_gpu_rednet50_forward_backward_matches_reference(monkeypatch, channels_last):
    _cuda_ok()
    import rednet

    torch.manual_seed(0)
    model = rednet.create_model("rednet50").cuda().double()
    for m in model.modules():  # non-zero last BN so every involution gets a gradient
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
    img = torch.randn(2, 3, 96, 96, device="cuda", dtype=torch.float64)
    target = torch.tensor([3, 7], device="cuda")
    if channels_last:
        model, img = model.to(memory_format=torch.channels_last), img.contiguous(memory_format=torch.channels_last)
    results = []
    for backend in ("cupy", "reference"):
        monkeypatch.setenv("REDNET_INVOLUTION_BACKEND", backend)
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(img), target)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l0, l1, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g0, g1, rtol=1e-8, atol=1e-10)


@cuda
def test_gpu_autocast_reaches_kernel_in_low_precision(monkeypatch):
    _cuda_ok()
    from rednet.layers import Involution

    layer = Involution(64, 7, 2).cuda().to(memory_format=torch.channels_last)
    x = torch.randn(2, 64, 28, 28, device="cuda").contiguous(memory_format=torch.channels_last)
    seen = []
    real = _plan.plan_forward
    monkeypatch.setattr(_plan, "plan_forward", lambda *a: seen.append((a[0].dtype, a[1].dtype)) or real(*a))
    monkeypatch.setenv("REDNET_INVOLUTION_BACKEND", "cupy")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    y.float().sum().backward()
    assert seen == [(torch.bfloat16, torch.bfloat16)] and y.dtype == torch.bfloat16
    assert layer.conv2.conv.weight.grad is not None


@cuda
def test_gpu_torch_compile_rednet_fullgraph(monkeypatch):
    _cuda_ok()
    import rednet

    monkeypatch.setenv("REDNET_INVOLUTION_BACKEND", "cupy")
    model = rednet.create_model("rednet26").cuda()
    img = torch.randn(2, 3, 64, 64, device="cuda")

    def step(m, x):
        out = m(x)
        out.square().mean().backward()
        return out

    torch.backends.cudnn.allow_tf32 = False  # compare like with like: inductor may pick other conv algorithms
    try:
        eager = step(model, img).detach()
        g_eager = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        launches = []
        real = _cupy.launch
        monkeypatch.setattr(_cupy, "launch", lambda plan, dev: launches.append(plan.name) or real(plan, dev))
        compiled = torch.compile(model, fullgraph=True)
        out = step(compiled, img).detach()
    finally:
        torch.backends.cudnn.allow_tf32 = True
    assert any("fwd" in n for n in launches) and any("bwd_input" in n for n in launches)  # the kernel ran inside
    torch.testing.assert_close(out, eager, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close([p.grad for p in model.parameters()], g_eager, rtol=1e-2, atol=1e-3)
