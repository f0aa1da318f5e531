"""The involution operator's front door (validation, autocast, backend selection) and reference backend (CPU)."""
import ast
import contextlib
import logging
import subprocess
import threading

import pytest
import torch

from rednet.ops import (
    _cpu,
    _cupy,
    can_use_cuda_kernel,
    can_use_native_kernel,
    describe_backend,
    involution,
    involution_output_size,
    involution_reference,
    involution_unfold,
    select_backend,
    use_backend,
)

from ..helpers import OP_SHAPES, ROOT

SHAPES = OP_SHAPES


def _inputs(b, c, g, h, w, k, s, d, dtype=torch.float64, pad=None):
    p = d * (k - 1) // 2 if pad is None else pad
    ho, wo = involution_output_size(h, k, s, p, d), involution_output_size(w, k, s, p, d)
    return torch.randn(b, c, h, w, dtype=dtype), torch.randn(b, g, k, k, ho, wo, dtype=dtype), p


def naive_involution(x, kernel, s, p, d):
    """docs/reference.md's formula, one output pixel and tap at a time."""
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


GRADCHECK_SHAPES = [(1, 4, 2, 5, 6, 3, 1, 1), (2, 2, 1, 6, 5, 3, 2, 2), (1, 2, 2, 5, 5, 5, 2, 1)]


@pytest.mark.parametrize("shape", GRADCHECK_SHAPES, ids=str)
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


def _record_bytes(sizes: list):
    """A saved-tensor pack hook that appends each saved tensor's size in bytes to ``sizes``."""
    return lambda t: sizes.append(t.numel() * t.element_size()) or t


def test_reference_saves_no_unfolded_tensor():
    # Memory: autograd keeps only x and the kernel, never a (B, C, K*K, Ho, Wo) tensor.
    x, k, _ = _inputs(2, 32, 2, 14, 14, 7, 1, 1, dtype=torch.float32)
    x.requires_grad_(True)
    k.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(_record_bytes(saved), lambda t: t):
        involution_reference(x, k, 1, 3, 1)
    assert sum(saved) <= x.numel() * 4 + k.numel() * 4
    unfold_saved = []
    with torch.autograd.graph.saved_tensors_hooks(_record_bytes(unfold_saved), lambda t: t):
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


# ----------------------------------------------------------------------------------------
# Backend selection: argument > use_backend > $REDNET_INVOLUTION_BACKEND > auto.


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


def test_dispatch_reasons_and_forcing(monkeypatch, caplog):
    x, k = torch.randn(1, 16, 8, 8), torch.randn(1, 1, 3, 3, 8, 8)
    ok, why = can_use_cuda_kernel(x)
    assert not ok and "CUDA tensor" in why
    ok, why = _cupy.can_run_on("cuda", 0, torch.int32)
    assert not ok and "int32" in why
    if not torch.cuda.is_available():
        ok, why = _cupy.can_run_on("cuda", 0, torch.float32)
        assert not ok and why
    with caplog.at_level(logging.DEBUG, logger="rednet.ops"):  # CPU tensors go to the native kernel: no float16
        assert select_backend(x.half()) == "reference"
    assert "declined" in caplog.text and "float16" in caplog.text
    monkeypatch.setenv("REDNET_INVOLUTION_BACKEND", "cupy")
    with pytest.raises(RuntimeError, match="forced but cannot run"):
        involution(x, k)
    monkeypatch.setenv("REDNET_INVOLUTION_BACKEND", "reference")
    assert select_backend(x) == "reference"


def _auto_on_cpu(x):
    # What auto picks for a CPU tensor: the native kernel where it builds, else the reference.
    return "native" if can_use_native_kernel(x)[0] else "reference"


def test_describe_backend_says_which_runs_and_why(monkeypatch):
    monkeypatch.delenv("REDNET_INVOLUTION_BACKEND", raising=False)
    x = torch.empty(0)
    ok, why = can_use_native_kernel(x)
    assert describe_backend("cpu", torch.float32) == ("native" if ok else f"reference ({why})")
    assert describe_backend(torch.device("cpu"), torch.float16).startswith(
        "reference (dtype torch.float16 has no native CPU kernel")
    assert describe_backend("meta", torch.float32) == (
        "reference (input is on meta, the CUDA kernel needs a CUDA tensor)")
    with use_backend("reference"):
        assert describe_backend("cpu", torch.float32) == (
            "reference (forced by $REDNET_INVOLUTION_BACKEND or use_backend)" if ok else f"reference ({why})")
    monkeypatch.setenv("REDNET_INVOLUTION_BACKEND", "cupy")
    assert describe_backend("cpu", torch.float32).startswith(
        "unavailable (involution backend 'cupy' was forced but cannot run: input is on cpu")
    monkeypatch.setenv("REDNET_INVOLUTION_BACKEND", "fast")
    assert describe_backend("cpu", torch.float32).startswith("unavailable (unknown involution backend 'fast'")


def test_choosing_asks_each_backend_at_most_once(monkeypatch):
    # The choice walks one table: each backend is asked whether it can run once per choice.
    monkeypatch.delenv("REDNET_INVOLUTION_BACKEND", raising=False)
    asked = []
    for module in (_cpu, _cupy):
        real = module.can_run_on
        monkeypatch.setattr(module, "can_run_on", lambda *a, real=real, name=module.__name__: asked.append(name)
                            or real(*a))
    x = torch.randn(1, 4, 5, 5)
    for backend in (None, "native", "auto"):
        asked.clear()
        with contextlib.suppress(RuntimeError):  # 'native' forced where it cannot be built
            select_backend(x, backend)
        assert sorted(set(asked)) == sorted(asked), asked


def test_use_backend_forces_and_restores(monkeypatch):
    x, k, _ = _inputs(1, 4, 1, 5, 5, 3, 1, 1)
    monkeypatch.setenv("REDNET_INVOLUTION_BACKEND", "cupy")
    with use_backend("reference"):  # over the environment variable
        assert select_backend(x) == "reference"
        torch.testing.assert_close(involution(x, k), involution_reference(x, k, 1, 1, 1))
    with pytest.raises(RuntimeError, match="'cupy' was forced but cannot run: input is on cpu"):
        involution(x, k)  # the environment variable applies again
    with use_backend("auto"):
        assert select_backend(x) == _auto_on_cpu(x)
    monkeypatch.delenv("REDNET_INVOLUTION_BACKEND")
    with use_backend("cupy"):
        assert select_backend(x, backend="reference") == "reference"  # the argument wins
        with pytest.raises(RuntimeError, match="'cupy' was forced but cannot run: input is on cpu.*use_backend"):
            involution(x, k)
    assert select_backend(x) == _auto_on_cpu(x)


def test_use_backend_nests_and_restores_after_an_exception():
    x, k, _ = _inputs(1, 4, 1, 5, 5, 3, 1, 1)
    with use_backend("cupy"):
        with use_backend("reference"):
            assert select_backend(x) == "reference"
        with pytest.raises(RuntimeError, match="forced but cannot run"):
            select_backend(x)
        with pytest.raises(KeyError):
            with use_backend("REFERENCE"):  # case-insensitive, like the environment variable
                assert select_backend(x) == "reference"
                raise KeyError("boom")
        with pytest.raises(RuntimeError, match="forced but cannot run"):
            select_backend(x)
    assert select_backend(x) == _auto_on_cpu(x)


@pytest.mark.parametrize("name", ["fast", "", None])
def test_use_backend_rejects_unknown_names(name):
    with pytest.raises(ValueError, match="unknown involution backend .* choose one of"):
        with use_backend(name):
            pass


def test_use_backend_blocks_in_threads_leave_no_setting_behind():
    x = torch.randn(1, 4, 5, 5)
    errors = []

    def work(name):
        try:
            for _ in range(200):
                with use_backend(name):
                    select_backend(x, backend="reference")
        except Exception as e:  # noqa: BLE001  (reported by the assertion below)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in ("reference", "cupy", "auto", "reference")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert select_backend(x) == _auto_on_cpu(x)  # no block open: auto on a CPU tensor
    outer, inner = use_backend("cupy"), use_backend("reference")
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)  # left out of order, as interleaved threads would
    assert select_backend(x) == "reference"
    inner.__exit__(None, None, None)
    assert select_backend(x) == _auto_on_cpu(x)


def test_use_backend_retraces_under_compile():
    # The forced backend is an input of the constant-folded choice, so a block entered after
    # tracing is not answered with the choice made while tracing.
    x, k, _ = _inputs(1, 4, 1, 5, 5, 3, 1, 1)
    fn = torch.compile(lambda a, b: involution(a, b), fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(x, k), involution_reference(x, k, 1, 1, 1))
    with use_backend("cupy"):
        with pytest.raises(RuntimeError, match="'cupy' was forced but cannot run"):  # Dynamo's error subclasses it
            fn(x, k)
    with use_backend("reference"):
        torch.testing.assert_close(fn(x, k), involution_reference(x, k, 1, 1, 1))


# ----------------------------------------------------------------------------------------
# Autocast, meta tensors, imports.


def test_front_door_autocast_casts_to_autocast_dtype():
    x, k = torch.randn(1, 16, 8, 8), torch.randn(1, 1, 3, 3, 8, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = involution(x, k)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), involution_reference(x.bfloat16(), k, 1, 1, 1).float())


def test_front_door_on_meta_tensors():
    y = involution(torch.empty(1, 16, 8, 8, device="meta"), torch.empty(1, 1, 3, 3, 4, 4, device="meta"), stride=2)
    assert y.shape == (1, 16, 4, 4) and y.device.type == "meta"


def test_importing_the_cuda_backend_needs_no_cupy():
    import importlib
    import sys

    code = "import sys, rednet, rednet.ops._cupy, rednet.ops._custom_op; assert 'cupy' not in sys.modules"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert importlib.util.find_spec("rednet.ops._cupy") is not None


def test_ops_modules_import_in_one_direction():
    """Each module of rednet/ops imports only modules after it here: no cycle, CuPy-free planning."""
    order = ["__init__", "_host_overhead", "_dispatch", "_selfcheck", "_custom_op", "_ort", "_fused", "_cpu",
             "_native_build", "_cupy", "_kernel_cache", "_cache_files", "_plan", "_memory_format", "_reference",
             "_export"]
    ops = ROOT / "rednet" / "ops"
    assert sorted(p.stem for p in ops.glob("*.py")) == sorted(order)
    for i, name in enumerate(order):
        tree = ast.parse((ops / f"{name}.py").read_text())
        imported = set()
        for node in ast.walk(tree):  # function-level (lazy) imports included
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                imported |= {node.module} if node.module else {a.name for a in node.names}
            elif isinstance(node, (ast.Import, ast.ImportFrom)) and name == "_plan":
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                assert not any(m.split(".")[0] == "cupy" for m in mods), f"_plan imports {mods}"
        assert imported <= set(order[i + 1:]), f"{name} imports {sorted(imported - set(order[i + 1:]))}"
