"""Propagation results as values: one outcome per new statement or known name."""

from __future__ import annotations

import pickle
import textwrap

import pytest

from flor_ray.propagation import (
    AlreadyLogged,
    Placed,
    PropagationError,
    Refused,
    format_placements,
    propagate_detailed,
)

OLD = textwrap.dedent('''
    import argparse

    import torch
    import flor_ray as flor

    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    net = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(net.parameters(), lr=flor.arg("lr", 0.1))
    X, Y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    with flor.checkpointing(net=net, opt=opt):
        for epoch in flor.loop("epoch", range(args.epochs)):
            for i in flor.loop("step", range(4)):
                loss = torch.nn.functional.cross_entropy(net(X[i::4]), Y[i::4])
                opt.zero_grad()
                loss.backward()
                opt.step()
                flor.log("loss", loss.item())
''')

# today: the step's gradient norm (placeable), and a scheduler the old version never built
TODAY = OLD.replace(
    '''opt = torch.optim.SGD(net.parameters(), lr=flor.arg("lr", 0.1))
''', '''opt = torch.optim.SGD(net.parameters(), lr=flor.arg("lr", 0.1))
sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
''').replace(
    '''            opt.step()
            flor.log("loss", loss.item())
''', '''            opt.step()
            flor.log("grad_norm", net.weight.grad.norm().item())
            flor.log("loss", loss.item())
        flor.log("lr", sched.get_last_lr()[0])
        sched.step()
''')


def test_each_statement_comes_out_as_one_outcome():
    assert TODAY.count("flor.log(") == OLD.count("flor.log(") + 2  # both statements written in
    res = propagate_detailed(TODAY, OLD, partial=True)
    kinds = {type(o).__name__: o for o in res.outcomes}
    assert set(kinds) == {"AlreadyLogged", "Placed", "Refused"}, res.outcomes
    assert kinds["AlreadyLogged"] == AlreadyLogged("loss")
    placed, refused = kinds["Placed"], kinds["Refused"]
    assert isinstance(placed, Placed) and placed.names == ("grad_norm",) and placed.loops == ("epoch", "step")
    assert isinstance(refused, Refused) and refused.names == ("lr",) and "`sched`" in refused.reason
    # the views that callers read are the outcomes, by kind
    assert res.placements == (placed,) and res.refused == (refused,) and res.skipped == ("loss",)
    assert res.refused_names == {"lr": refused.reason}
    assert 'flor.log("grad_norm"' in res.code and "sched" not in res.code
    assert pickle.loads(pickle.dumps(res)) == res
    text = format_placements(res)
    assert "= 'loss' already logged" in text and "! 'lr' not placed" in text


def test_without_partial_a_refusal_raises_and_nothing_is_returned():
    with pytest.raises(PropagationError, match="flor.log\\('lr'\\)"):
        propagate_detailed(TODAY, OLD)


def test_nothing_new_is_all_already_logged_and_byte_identical():
    res = propagate_detailed(OLD, OLD)
    assert res.code == OLD and res.outcomes == (AlreadyLogged("loss"),) and not res.changed

