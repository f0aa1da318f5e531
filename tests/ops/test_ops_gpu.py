"""The real CUDA kernels on a GPU (``gpu`` marker; skipped without one), against the reference.

Also what the first contact with a GPU must survive: the first-contact check on every
configuration RedNet uses, a compile failure, CUDA graph capture, two processes under
NCCL, more than 2**31 elements, and a process that only uses ``cuda:1``.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from rednet.ops import (
    KernelCheckWarning,
    _cupy,
    _kernel_cache,
    _plan,
    _selfcheck,
    check_cuda_kernel,
    involution,
    involution_reference,
    use_backend,
)

from ..helpers import ROOT

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
def test_gpu_low_precision_within_the_accumulation_bound(dtype, memory_format, k, s):
    _cuda_ok()
    x, kernel, pad = _rand_case(4, 64, 4, 28, 28, k, s, 1, dtype=dtype, memory_format=memory_format)
    x.requires_grad_()
    kernel.requires_grad_()
    grad_out = torch.randn(4, 64, *kernel.shape[-2:], device="cuda", dtype=dtype)
    y = involution(x, kernel, s, pad, 1, backend="cupy")
    gx, gw = torch.autograd.grad(y, (x, kernel), grad_out)
    assert y.dtype == gx.dtype == gw.dtype == dtype
    # Every element within what fp32 accumulation and one rounding guarantee (_selfcheck.error_bound).
    def exact(a, b, g):
        ar, br = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
        r = involution_reference(ar, br, s, pad, 1)
        return (r.detach(), *torch.autograd.grad(r, (ar, br), g.double()))

    refs, abs_sums = exact(x, kernel, grad_out), exact(x.abs(), kernel.abs(), grad_out.abs())
    for got, ref, abs_sum in zip((y, gx, gw), refs, abs_sums):
        bound = _selfcheck.error_bound(dtype, max(k * k, 16), ref, abs_sum)
        assert ((got.double() - ref).abs() <= bound).all()


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
def test_gpu_no_host_sync_current_stream_and_device(monkeypatch):
    _cuda_ok()
    x, kernel, pad = _rand_case(2, 32, 2, 28, 28, 7, 1, 1, dtype=torch.float32)
    grad_out = torch.randn(2, 32, 28, 28, device="cuda")
    xr, kr = x.clone().requires_grad_(), kernel.clone().requires_grad_()
    ref = involution_reference(xr, kr, 1, pad, 1)
    ref_grads = torch.autograd.grad(ref, (xr, kr), grad_out)
    involution(x, kernel, backend="cupy")  # compile and check outside the checked region
    streams = []
    real_call = _cupy._call
    monkeypatch.setattr(_cupy, "_call", lambda fn, grid, block, args, stream, shared_mem=0: streams.append(
        stream.ptr) or real_call(fn, grid, block, args, stream, shared_mem))
    # The inputs are written on the side stream behind a long sleep: a kernel queued on any
    # other stream (the legacy default one, the caller's previous one) runs before they are
    # ready and reads zeros, so a wrong stream fails the comparison and not only the spy.
    x_in, k_in, go_in = torch.zeros_like(x), torch.zeros_like(kernel), torch.zeros_like(grad_out)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.stream(side):
            torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time, far longer than queuing the rest
            x_in.copy_(x)
            k_in.copy_(kernel)
            go_in.copy_(grad_out)
            x_in.requires_grad_()
            k_in.requires_grad_()
            y = involution(x_in, k_in, backend="cupy")
            grads = torch.autograd.grad(y, (x_in, k_in), go_in)  # autograd runs it on the forward's stream
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.current_stream().wait_stream(side)
    assert streams == [side.cuda_stream] * 3  # forward, grad_input, grad_kernel
    torch.testing.assert_close((y, *grads), (ref, *ref_grads))
    if torch.cuda.device_count() > 1:  # a tensor on cuda:1 while cuda:0 is current: cuda:1's stream
        streams.clear()
        x1, k1 = x.detach().to("cuda:1"), kernel.to("cuda:1")
        torch.testing.assert_close(involution(x1, k1, backend="cupy").cpu(), ref.detach().cpu())
        assert streams and set(streams) == {torch.cuda.current_stream(1).cuda_stream}  # the check's launches too
        assert torch.cuda.current_device() == 0


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
    assert check_cuda_kernel("cuda", torch.bfloat16, 7, 2, 1, "nhwc").ok  # its launches are not the layer's
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


# ----------------------------------------------------------------------------------------
# First contact.


@cuda
@pytest.mark.parametrize("memory_format", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", list(_plan.TYPE_NAMES), ids=str)
def test_gpu_first_contact_check_passes_on_rednets_windows_and_is_cheap(monkeypatch, dtype, memory_format):
    _cuda_ok()
    for window in [(3, 1, 1), (7, 1, 1), (7, 2, 1)]:
        _cupy.prepare(torch.device("cuda", 0), (dtype, *window))  # the compile, which the first launch pays anyway
        monkeypatch.setattr(_selfcheck, "_verdicts", {})
        check = check_cuda_kernel("cuda:0", dtype, *window, memory_format=memory_format)
        assert check.ok, check
        assert check.seconds < 0.5, check  # the check itself, beyond the compile


def _raise(exc):
    def fn(*a, **k):
        raise exc
    return fn


@cuda
def test_gpu_auto_falls_back_on_an_injected_compile_failure(monkeypatch):
    _cuda_ok()
    monkeypatch.delenv("REDNET_INVOLUTION_BACKEND", raising=False)
    monkeypatch.setattr(_selfcheck, "_verdicts", {})
    monkeypatch.setattr(_selfcheck, "_warned", set())
    monkeypatch.setattr(_cupy, "_functions", {})  # nothing loaded yet in this "process"
    monkeypatch.setattr(_kernel_cache, "load", lambda key, names: None)  # nothing on disk either
    monkeypatch.setattr(_cupy, "compile_binary", _raise(RuntimeError("nvrtc: error: injected failure")))
    launches = []
    real = _cupy.launch
    monkeypatch.setattr(_cupy, "launch", lambda plan, dev: launches.append(plan.name) or real(plan, dev))
    x, kernel, pad = _rand_case(2, 32, 2, 19, 23, 7, 2, 1, dtype=torch.float32, memory_format="nhwc")
    with pytest.warns(KernelCheckWarning, match="compile stage: RuntimeError: nvrtc: error: injected failure"):
        y = involution(x, kernel, 2)
    assert launches == []
    torch.testing.assert_close(y, involution_reference(x, kernel, 2, pad, 1))
    with pytest.raises(RuntimeError, match="injected failure"):
        involution(x, kernel, 2, backend="cupy")


@cuda
def test_gpu_cuda_graph_capture_after_warm_up(monkeypatch):
    _cuda_ok()
    monkeypatch.delenv("REDNET_INVOLUTION_BACKEND", raising=False)
    x, kernel, pad = _rand_case(2, 64, 4, 28, 28, 7, 2, 1, dtype=torch.float32, memory_format="nhwc")
    launches = []
    real = _cupy.launch
    monkeypatch.setattr(_cupy, "launch", lambda plan, dev: launches.append(plan.name) or real(plan, dev))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph asks; it runs the check
        for _ in range(2):
            involution(x, kernel, 2)
    torch.cuda.current_stream().wait_stream(side)
    launches.clear()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = involution(x, kernel, 2)
    assert launches and all("fwd" in n for n in launches)  # the kernel is in the graph
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.testing.assert_close(y, involution_reference(x, kernel, 2, pad, 1))


@cuda
def test_gpu_cuda_graph_capture_before_any_check_uses_the_reference(monkeypatch):
    _cuda_ok()
    monkeypatch.delenv("REDNET_INVOLUTION_BACKEND", raising=False)
    monkeypatch.setattr(_selfcheck, "_verdicts", {})  # never checked in this "process"
    monkeypatch.setattr(_selfcheck, "_warned", set())
    x, kernel, pad = _rand_case(2, 32, 2, 14, 14, 3, 1, 1, dtype=torch.float32)
    involution_reference(x, kernel, 1, pad, 1)  # warm the reference up instead
    graph = torch.cuda.CUDAGraph()
    with pytest.warns(KernelCheckWarning, match="capture stage"):
        with torch.cuda.graph(graph):
            y = involution(x, kernel)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(y, involution_reference(x, kernel, 1, pad, 1))
    assert _selfcheck._verdicts == {}  # checked at the next eager call


@cuda
@pytest.mark.parametrize("memory_format", ["nchw", "nhwc"])
def test_gpu_more_than_2_to_the_31_elements(memory_format):
    _cuda_ok()
    b, c, g, h, w = 2049, 64, 4, 128, 128  # x has 2049 * 2**20 > 2**31 elements
    free, _ = torch.cuda.mem_get_info()
    if free < 32 * 2**30:
        pytest.skip(f"needs 32 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    x, kernel, pad = _rand_case(b, c, g, h, w, 3, 1, 1, dtype=torch.bfloat16, memory_format=memory_format)
    assert x.numel() > 2**31
    x.requires_grad_()
    kernel.requires_grad_()
    y = involution(x, kernel, backend="cupy")
    grad_out = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, kernel), grad_out)
    # The batch items are independent: the first and the last two (past element 2**31) against the reference.
    for sl in (slice(0, 1), slice(b - 2, b)):
        xr, kr = x[sl].detach().float().requires_grad_(), kernel[sl].detach().float().requires_grad_()
        yr = involution_reference(xr, kr, 1, pad, 1)
        rgx, rgw = torch.autograd.grad(yr, (xr, kr), grad_out[sl].float())
        for got, ref in ((y[sl], yr), (gx[sl], rgx), (gw[sl], rgw)):
            torch.testing.assert_close(got.float(), ref, rtol=1.6e-2, atol=1.6e-2 * ref.abs().max().item())


def _ddp_worker(rank: int, world: int, init_file: str, cache_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from rednet.layers import Involution

    os.environ["REDNET_CACHE_DIR"] = cache_dir  # both ranks compile or load through one disk cache
    # Full fp32 convolutions: the two backends' tiny differences must not be rounded apart by TF32.
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        layer = Involution(64, 7, 2).cuda().to(memory_format=torch.channels_last)
        model = DistributedDataParallel(layer, device_ids=[rank])
        gen = torch.Generator(device="cuda").manual_seed(rank)  # different data per rank
        x = torch.randn(4, 64, 28, 28, device="cuda", generator=gen).contiguous(memory_format=torch.channels_last)
        grads = {}
        for backend in ("cupy", "reference"):
            model.zero_grad(set_to_none=True)
            with use_backend(backend):
                model(x).square().mean().backward()  # gradients all-reduced over both ranks
            grads[backend] = [p.grad.clone() for p in layer.parameters()]
        torch.testing.assert_close(grads["cupy"], grads["reference"], rtol=1e-3, atol=1e-5)
        gathered = [torch.zeros_like(grads["cupy"][0]) for _ in range(world)]
        dist.all_gather(gathered, grads["cupy"][0])
        torch.testing.assert_close(gathered[0], gathered[1], rtol=0, atol=0)  # one model on every rank
    finally:
        dist.destroy_process_group()


@cuda
def test_gpu_two_processes_nccl_step(tmp_path):
    _cuda_ok()
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    import torch.distributed as dist

    if not dist.is_nccl_available():
        pytest.skip("NCCL is not available")
    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "cache")), nprocs=2)
    assert len(list((tmp_path / "cache" / "kernels").glob("*.bin"))) >= 1  # written once, atomically


@cuda
def test_gpu_a_process_on_cuda_1_creates_no_context_on_cuda_0():
    _cuda_ok()
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    # A fresh process: this one already has contexts. CuPy's Device context would set
    # cuda:0 back on exit, creating a context (hundreds of MB) there.
    code = """
import torch
from rednet.ops import involution
x = torch.randn(2, 32, 14, 14, device="cuda:1", requires_grad=True)
k = torch.randn(2, 2, 3, 3, 14, 14, device="cuda:1", requires_grad=True)
involution(x, k, backend="reference").sum().backward()
torch.cuda.synchronize(1)
if torch._C._cuda_hasPrimaryContext(0):
    print("SKIP: PyTorch itself created a context on cuda:0")
    raise SystemExit(0)
involution(x, k, backend="cupy").sum().backward()
torch.cuda.synchronize(1)
assert not torch._C._cuda_hasPrimaryContext(0), "the CUDA kernel path created a context on cuda:0"
print("OK")
"""
    root = ROOT
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert res.returncode == 0, res.stderr[-3000:]
    if res.stdout.startswith("SKIP"):
        pytest.skip(res.stdout.strip())
    assert res.stdout.strip() == "OK"
