"""The training step's deferred host reads (issue 17, item 3): no host synchronisation per step, and the same
weights as the eager checks."""
from __future__ import annotations

import pytest
import torch

from rednet.data import DeviceInput


def _tiny_ctx(**kw):
    import dataclasses

    from rednet.engine.step import StepContext

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1.0 / (1 + it))
    ctx = StepContext(model=model, optimizer=opt, scheduler=sched, loss_fn=torch.nn.CrossEntropyLoss(),
                      device=torch.device("cpu"), input=DeviceInput((0.5,) * 3, (0.25,) * 3))
    return dataclasses.replace(ctx, **kw)


def _uint8_batches(n, bad_at=()):
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        images = torch.randint(0, 256, (4, 3, 4, 4), generator=g, dtype=torch.uint8)
        if i in bad_at:  # float NaNs pass through DeviceInput untouched: a non-finite loss
            images = torch.full((4, 3, 4, 4), float("nan"))
        out.append((images, torch.randint(0, 3, (4,), generator=g), 0))
    return out


@pytest.fixture
def host_reads(monkeypatch):
    """The global step at each host read of a tensor (.item, .tolist, bool, float, int)."""
    import rednet.engine.loop as loop

    reads, where = [], {"state": None}
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, **kwargs):
            if where["state"] is not None:
                reads.append(where["state"].global_step)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    real_step = loop.train_step

    def tracking(ctx, batches, state, checks=None):
        where["state"] = state
        return real_step(ctx, batches, state, checks)

    monkeypatch.setattr(loop, "train_step", tracking)
    return reads


@pytest.mark.parametrize("deferred", [True, False], ids=["cuda-path", "cpu-path"])
def test_the_loop_reads_the_device_only_at_log_points(host_reads, deferred):
    from rednet.engine.loop import train_one_epoch
    from rednet.engine.step import TrainState

    ctx = _tiny_ctx(check_every_step=not deferred, log_every=4)
    train_one_epoch(ctx, _uint8_batches(8), TrainState(), steps=8, main_process=False)
    read_at = set(host_reads)
    if deferred:  # the CUDA code path, on a CPU stand-in: reads at steps 4 and 8 only
        assert read_at <= {4, 8}, sorted(read_at)
    else:  # the CPU path reads its flags at every step
        assert set(range(8)) <= read_at


def _state(ctx):
    params = ctx.optimizer.param_groups[0]["params"]
    return ({k: v.clone() for k, v in ctx.model.state_dict().items()},
            {i: ctx.optimizer.state[p]["momentum_buffer"].clone() for i, p in enumerate(params)})


@pytest.mark.parametrize("ckpt_every", [0, 1])
def test_a_non_finite_loss_never_reaches_the_weights_on_the_deferred_path(ckpt_every):
    from rednet.engine.loop import train_one_epoch
    from rednet.engine.step import TrainState
    from rednet.engine.stepguard import NonFiniteLossError

    reference = _tiny_ctx(check_every_step=False)
    train_one_epoch(reference, _uint8_batches(2), TrainState(), steps=2, main_process=False)
    weights, momentum = _state(reference)

    saved = []
    ctx = _tiny_ctx(check_every_step=False, log_every=5, ckpt_every=ckpt_every,
                    on_step=lambda s: saved.append((s.global_step, _state(ctx))) if ckpt_every else None)
    state = TrainState()
    with pytest.raises(NonFiniteLossError, match=r"epoch 0 iteration 2 \(global step 2\)") as info:
        train_one_epoch(ctx, _uint8_batches(6, bad_at={2}), state, steps=6, main_process=False)
    # Every later step was skipped too: the weights, BN statistics and momentum are those of step 2.
    now_weights, now_momentum = _state(ctx)
    for k in weights:
        assert torch.equal(now_weights[k], weights[k]), k
    for k in momentum:
        assert torch.equal(now_momentum[k], momentum[k])
    assert (state.iteration, state.global_step, ctx.scheduler.last_epoch) == (2, 2, 2)
    assert ctx.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 / 3)
    if ckpt_every:  # a checkpoint is written only after a read: none holds a step after the bad one
        assert [step for step, _ in saved] == [1, 2] and "0 after it" in str(info.value)
    else:  # read at step 5: the bad step 2 and the two after it were skipped
        assert "2 after it" in str(info.value)


def test_deferred_and_eager_checks_train_the_same_weights():
    from rednet.engine.loop import train_one_epoch
    from rednet.engine.step import TrainState

    results = []
    for deferred in (True, False):
        ctx = _tiny_ctx(check_every_step=not deferred, log_every=3)
        out = train_one_epoch(ctx, _uint8_batches(5), TrainState(), steps=5, main_process=False)
        results.append((_state(ctx), out.stats.train_loss))
    (w1, m1), loss1 = results[0]
    (w2, m2), loss2 = results[1]
    assert all(torch.equal(w1[k], w2[k]) for k in w1) and all(torch.equal(m1[k], m2[k]) for k in m1)
    assert loss1 == loss2


def test_fp16_overflow_on_the_deferred_path_is_a_skipped_step_not_an_error():
    """GradScaler's overflow skips the step on the device and lowers the scale, as scaler.step would."""
    from rednet.engine.step import TrainState, train_step

    ctx = _tiny_ctx(check_every_step=False, amp_dtype=torch.float16)
    ctx.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)  # the first step's gradients overflow
    before = {k: v.clone() for k, v in ctx.model.state_dict().items() if "running" not in k}
    batches = iter(ctx.input.batches(_uint8_batches(2), ctx.device))
    state = TrainState()
    train_step(ctx, batches, state)
    after = {k: v for k, v in ctx.model.state_dict().items() if "running" not in k}
    assert all(torch.equal(before[k], after[k]) for k in before if "num_batches" not in k)
    assert ctx.scaler.get_scale() < 2.0**100 and state.global_step == 1
    step = train_step(ctx, batches, state)
    assert torch.isfinite(step.loss)
