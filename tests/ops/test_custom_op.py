"""The ``rednet::involution`` custom op through its CPU implementation, as CI runs it.

Schema (``opcheck``), fake functions (shapes and strides), autograd wiring and
``torch.compile`` tracing, without a GPU; the CUDA implementation is tested in
``test_ops_gpu.py``.
"""
from __future__ import annotations

import pytest
import torch

from rednet.ops import involution_reference


def _op_inputs(memory_format: str, dtype=torch.float64):
    x = torch.randn(2, 4, 5, 7, dtype=dtype)
    k = torch.randn(2, 2, 3, 3, 3, 4, dtype=dtype)  # stride 2, padding 1
    if memory_format == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
        k = torch.randn(2, 18, 3, 4, dtype=dtype).contiguous(memory_format=torch.channels_last).view(2, 2, 3, 3, 3, 4)
    return x.requires_grad_(), k.requires_grad_()


@pytest.mark.parametrize("memory_format", ["nchw", "nhwc"])
def test_custom_op_opcheck_cpu(memory_format):
    from rednet.ops import _custom_op  # noqa: F401

    x, k = _op_inputs(memory_format)
    torch.library.opcheck(torch.ops.rednet.involution.default, (x, k, 2, 1, 1))
    go = torch.randn(2, 4, 3, 4, dtype=torch.float64)
    torch.library.opcheck(torch.ops.rednet.involution_backward_input.default, (go, x.detach(), k.detach(), 2, 1, 1))
    torch.library.opcheck(torch.ops.rednet.involution_backward_kernel.default, (go, x.detach(), k.detach(), 2, 1, 1))


@pytest.mark.parametrize("memory_format", ["nchw", "nhwc"])
def test_custom_op_grads_and_fake_strides_cpu(memory_format):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from rednet.ops import _custom_op  # noqa: F401

    x, k = _op_inputs(memory_format)
    y = torch.ops.rednet.involution(x, k, 2, 1, 1)
    torch.testing.assert_close(y, involution_reference(x, k, 2, 1, 1))
    assert torch.autograd.gradcheck(lambda a, b: torch.ops.rednet.involution(a, b, 2, 1, 1), (x, k), fast_mode=True)
    mode = FakeTensorMode()
    fx, fk = mode.from_tensor(x.detach()), mode.from_tensor(k.detach())
    with mode:
        fy = torch.ops.rednet.involution(fx, fk, 2, 1, 1)
        fgw = torch.ops.rednet.involution_backward_kernel(fy, fx, fk, 2, 1, 1)
    assert fy.shape == y.shape and fy.stride() == y.stride()
    gw = torch.ops.rednet.involution_backward_kernel(y.detach(), x.detach(), k.detach(), 2, 1, 1)
    assert fgw.shape == k.shape and fgw.stride() == gw.stride()


def test_custom_op_compiles_fullgraph_cpu():
    from rednet.ops import _custom_op  # noqa: F401

    x, k = _op_inputs("nchw")

    def loss(a, b):
        return torch.ops.rednet.involution(a, b, 2, 1, 1).square().sum()

    out = torch.compile(loss, fullgraph=True, backend="aot_eager")(x, k)
    gx, gk = torch.autograd.grad(out, (x, k))
    ref = loss(x, k)
    rgx, rgk = torch.autograd.grad(ref, (x, k))
    torch.testing.assert_close((out, gx, gk), (ref, rgx, rgk))

