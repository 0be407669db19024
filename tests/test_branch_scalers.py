"""Under fp16 each branch of a pack has its own loss scale (issue 14 item 5).

With one GradScaler for the whole pack (accelerate's, the old engine), every branch's ``optimizer.step()``
updated the shared scale: an overflow in one branch halved the scale the others' gradients were then
unscaled with, and the growth counter advanced k times per step. The engine now scales, unscales, skips and
updates each branch through its own scaler (``synqt.training.loop.BranchScaler``). fp16 runs only on CUDA; this
test drives the same code with real ``torch.amp.GradScaler("cpu")`` objects on fp32 tensors, where an
overflow is made by a huge loss.
"""

from __future__ import annotations

import torch

from synqt.training.loop import BranchScaler


def _branch(seed: int) -> tuple[torch.nn.Linear, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    layer = torch.nn.Linear(4, 3)
    return layer, torch.optim.AdamW(layer.parameters(), lr=0.1)


def test_an_overflowing_branch_does_not_touch_its_pack_mates_scale_or_step():
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    a, opt_a = _branch(1)
    b, opt_b = _branch(2)
    ref, opt_ref = _branch(2)  # branch b trained alone, unscaled, in plain fp32: the expected weights
    sa, sb = BranchScaler(True, "cpu", init_scale=2.0**16), BranchScaler(True, "cpu", init_scale=2.0**16)
    for _ in range(3):
        opt_a.zero_grad(), opt_b.zero_grad(), opt_ref.zero_grad()
        loss_a = a(x).pow(2).mean() * 1e36  # x 65536 overflows fp32: inf gradients in branch a only
        loss_b = b(x).pow(2).mean()
        torch.stack([sa.scale(loss_a), sb.scale(loss_b)]).sum().backward()  # one backward for the pack
        stepped = [sa.step(opt_a), sb.step(opt_b)]
        ref(x).pow(2).mean().backward()
        opt_ref.step()
        assert stepped == [False, True]
    assert sa.scaler.get_scale() == 2.0**13  # halved three times
    assert sb.scaler.get_scale() == 2.0**16  # untouched by a's overflows
    for p, q in zip(b.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_a_disabled_scaler_is_the_plain_step():
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    m, opt = _branch(3)
    ref, opt_ref = _branch(3)
    s = BranchScaler(False, "cpu")
    s.scale(m(x).pow(2).mean()).backward()
    assert s.step(opt)
    ref(x).pow(2).mean().backward()
    opt_ref.step()
    for p, q in zip(m.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q)
    assert s.state_dict() is None


def test_scaler_state_round_trips_for_resume():
    s = BranchScaler(True, "cpu", init_scale=2.0**10)
    t = BranchScaler(True, "cpu")
    t.load_state_dict(s.state_dict())
    assert t.scaler.get_scale() == 2.0**10
