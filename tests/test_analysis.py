"""Static analysis of training scripts: source strings in, needs and sites out."""

from __future__ import annotations

import pickle
import textwrap
from pathlib import Path

import pytest

from flor_ray.errors import FlorError, PlanningError, QueryError
from flor_ray.analysis import LogSite, Need, ScriptAnalysis, UnknownLogNameError, analyze

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CASES = SHARED / "cases" / "propagation"


def an(src: str) -> ScriptAnalysis:
    return analyze(textwrap.dedent(src))


def kind(src: str, name: str) -> str:
    return an(src).need(name).kind


BASIC = """
import torch
import flor_ray as flor

net = Net()
opt = torch.optim.SGD(net.parameters(), lr=flor.arg("lr", 0.1))
flor.log("n_params", sum(p.numel() for p in net.parameters()))
with flor.checkpointing(model=net, optimizer=opt):
    for epoch in flor.loop("epoch", range(10)):
        net.train()
        running_loss = 0.0
        for x, y in flor.loop("step", loader):
            opt.zero_grad()
            loss = loss_fn(net(x), y)
            loss.backward()
            opt.step()
            flor.log("loss", loss.item())
            running_loss += loss.item()
        avg = running_loss / len(loader)
        flor.log("avg_loss", avg)
        acc = evaluate(net, val_loader)
        flor.log("val_acc", acc)
flor.log("final_acc", evaluate(net, test_loader))
"""


# ---------------------------------------------------------------- the four kinds


def test_basic_structure():
    a = an(BASIC)
    assert a.outer_loop == "epoch"
    assert a.checkpointed == ("net", "opt")
    assert a.logged_names == ("n_params", "loss", "avg_loss", "val_acc", "final_acc")
    assert [s.loop_path for s in a.sites] == [(), ("epoch", "step"), ("epoch",), ("epoch",), ()]
    assert all(s.function is None for s in a.sites)
    assert a.loop_carried == ()


def test_setup_kind():
    need = an(BASIC).need("n_params")
    assert need.kind == "setup"
    assert "before the outer loop 'epoch'" in need.reason
    assert "net" in need.reads


def test_inner_kind_inside_step_loop():
    need = an(BASIC).need("loss")
    assert need.kind == "inner"
    assert "inside the inner loop 'step'" in need.reason


def test_outer_kind_reads_only_checkpointed_model():
    need = an(BASIC).need("val_acc")
    assert need.kind == "outer"
    assert need.carried == ()
    assert {"acc", "net", "val_loader"} <= set(need.reads)


def test_after_kind():
    need = an(BASIC).need("final_acc")
    assert need.kind == "after"
    assert "after the outer loop" in need.reason


def test_running_total_through_intermediate_assignment_is_inner():
    need = an(BASIC).need("avg_loss")
    assert need.kind == "inner"
    assert "'running_loss'" in need.reason and "inner loop 'step'" in need.reason
    assert {"avg", "running_loss", "loss"} <= set(need.reads)
    # running_loss is reset at the top of every epoch: not loop-carried
    assert need.carried == ()


def test_after_reading_inner_loop_value_is_inner():
    src = """
    import flor_ray as flor
    with flor.checkpointing(model=net):
        for epoch in flor.loop("epoch", range(3)):
            for x in flor.loop("step", data):
                last = step(net, x)
    flor.log("last", last)
    """
    need = an(src).need("last")
    assert need.kind == "inner"
    assert "'last'" in need.reason


def test_slice_through_several_assignments():
    src = """
    import flor_ray as flor
    with flor.checkpointing(model=net):
        for epoch in flor.loop("epoch", range(3)):
            for x in flor.loop("step", data):
                total = total_of(x)
            a = 1.0
            b = a * 2
            c = b + score(net)
            flor.log("c", c)
            d = b + total
            flor.log("d", d)
    """
    a = an(src)
    assert a.need("c").kind == "outer"
    assert {"a", "b", "c", "net"} <= set(a.need("c").reads)
    assert "total" not in a.need("c").reads
    assert a.need("d").kind == "inner"
    assert "'total'" in a.need("d").reason


def test_reassignment_after_inner_loop_kills_inner_definition():
    src = """
    import flor_ray as flor
    for epoch in flor.loop("epoch", range(3)):
        for x in flor.loop("step", data):
            val = x * 2
        val = evaluate(net)
        flor.log("val", val)
    """
    assert kind(src, "val") == "outer"


def test_conditional_reassignment_does_not_kill():
    src = """
    import flor_ray as flor
    for epoch in flor.loop("epoch", range(3)):
        for x in flor.loop("step", data):
            val = x * 2
        if epoch % 2:
            val = evaluate(net)
        flor.log("val", val)
    """
    assert kind(src, "val") == "inner"


# ---------------------------------------------------------------- gradients and mutations


def test_grad_read_in_tail_is_inner():
    src = """
    import flor_ray as flor
    with flor.checkpointing(model=net, optimizer=opt):
        for epoch in flor.loop("epoch", range(3)):
            for x in flor.loop("step", data):
                opt.step()
            gn = sum(p.grad.norm() ** 2 for p in net.parameters()) ** 0.5
            flor.log("grad_norm", gn)
    """
    need = an(src).need("grad_norm")
    assert need.kind == "inner"
    assert "gradients" in need.reason


def test_grad_read_inside_helper_function_is_inner():
    src = """
    import flor_ray as flor

    def grad_norm(model):
        total = 0.0
        for p in model.parameters():
            total += p.grad.norm().item() ** 2
        return total ** 0.5

    with flor.checkpointing(model=net, optimizer=opt):
        for epoch in flor.loop("epoch", range(3)):
            for x in flor.loop("step", data):
                opt.step()
            flor.log("grad_norm", grad_norm(net))
    """
    assert kind(src, "grad_norm") == "inner"


def test_clip_grad_norm_in_tail_is_inner():
    src = """
    import torch
    import flor_ray as flor
    for epoch in flor.loop("epoch", range(3)):
        for x in flor.loop("step", data):
            opt.step()
        norm = torch.nn.utils.clip_grad_norm_(net.parameters(), float("inf"))
        flor.log("norm", norm)
    """
    assert kind(src, "norm") == "inner"


def test_no_grad_context_is_not_a_gradient_read():
    src = """
    import torch
    import flor_ray as flor
    with flor.checkpointing(model=net):
        for epoch in flor.loop("epoch", range(3)):
            for x in flor.loop("step", data):
                train(net, x)
            with torch.no_grad():
                acc = accuracy(net)
            flor.log("acc", acc)
    """
    assert kind(src, "acc") == "outer"


@pytest.mark.parametrize(
    "mutation",
    ["metrics.update(out)", "hist.append(out)", "hist[i] = out", "hist.last = out", "hist += [out]"],
)
def test_non_checkpointed_object_mutated_in_inner_loop_is_inner(mutation):
    src = f"""
    import flor_ray as flor
    with flor.checkpointing(model=net):
        for epoch in flor.loop("epoch", range(3)):
            metrics = Metrics()
            hist = Hist()
            for i, x in enumerate(flor.loop("step", data)):
                out = net(x)
                {mutation}
            flor.log("summary", summarize(metrics, hist))
    """
    need = an(src).need("summary")
    assert need.kind == "inner"
    assert "mutated" in need.reason or "written" in need.reason


def test_checkpointed_objects_mutated_in_inner_loop_are_restored():
    # optimizer.step() mutates the model and the optimizer, both checkpointed
    src = """
    import flor_ray as flor
    with flor.checkpointing(model=model, optimizer=optimizer):
        for epoch in flor.loop("epoch", range(3)):
            for x, y in flor.loop("step", loader):
                optimizer.zero_grad()
                criterion(model(x), y).backward()
                optimizer.step()
            flor.log("weight_norm", model.fc.weight.norm().item())
            flor.log("lr", optimizer.param_groups[0]["lr"])
    """
    a = an(src)
    assert a.need("weight_norm").kind == "outer"
    assert a.need("lr").kind == "outer"
    assert a.loop_carried == ()


def test_checkpointed_object_read_between_inner_loops_is_inner():
    # skip mode restores the checkpoint only when the *last* inner loop exits
    src = """
    import flor_ray as flor
    with flor.checkpointing(model=model):
        for epoch in flor.loop("epoch", range(3)):
            for x in flor.loop("train", train_loader):
                step(model, x)
            flor.log("mid", evaluate(model))
            for x in flor.loop("val", val_loader):
                check(model, x)
            flor.log("end", evaluate(model))
    """
    a = an(src)
    assert a.need("mid").kind == "inner"
    assert "between inner loops" in a.need("mid").reason
    assert a.need("end").kind == "outer"


def test_function_mutating_its_argument_in_inner_loop():
    src = """
    import flor_ray as flor

    def record(store, value):
        store.append(value)

    with flor.checkpointing(model=net):
        for epoch in flor.loop("epoch", range(3)):
            losses = []
            for x in flor.loop("step", data):
                record(losses, net(x))
            flor.log("mean_loss", sum(losses) / len(losses))
    """
    assert kind(src, "mean_loss") == "inner"


# ---------------------------------------------------------------- loop-carried state


def test_global_step_is_loop_carried():
    src = """
    import flor_ray as flor
    global_step = 0
    with flor.checkpointing(model=net, optimizer=opt):
        for epoch in flor.loop("epoch", range(3)):
            for x in flor.loop("step", data):
                global_step += 1
                flor.log("global_step", global_step)
            flor.log("epoch_end_step", global_step)
    """
    a = an(src)
    assert a.loop_carried == ("global_step",)
    need = a.need("global_step")
    assert need.kind == "inner"
    assert need.carried == ("global_step",)
    assert "first iteration" in need.reason
    assert a.need("epoch_end_step").kind == "inner"
    assert a.need("epoch_end_step").carried == ("global_step",)


def test_best_accuracy_is_loop_carried_but_outer():
    src = """
    import flor_ray as flor
    best_acc = 0.0
    with flor.checkpointing(model=net):
        for epoch in flor.loop("epoch", range(3)):
            for x in flor.loop("step", data):
                train(net, x)
            acc = evaluate(net)
            best_acc = max(best_acc, acc)
            flor.log("best_acc", best_acc)
            flor.log("acc", acc)
    flor.log("final_best", best_acc)
    """
    a = an(src)
    assert a.loop_carried == ("best_acc",)
    need = a.need("best_acc")
    assert need.kind == "outer"
    assert need.carried == ("best_acc",)
    assert a.need("acc").carried == ()
    after = a.need("final_best")
    assert after.kind == "after" and after.carried == ("best_acc",)


def test_reset_at_top_of_epoch_is_not_carried_and_target_excluded():
    src = """
    import flor_ray as flor
    with flor.checkpointing(model=net):
        for epoch in flor.loop("epoch", range(3)):
            running = 0.0
            for x in flor.loop("step", data):
                running += x
            flor.log("e", epoch)
    """
    a = an(src)
    assert a.loop_carried == ()
    assert a.need("e").kind == "outer"


def test_history_list_appended_at_outer_level_is_carried():
    src = """
    import flor_ray as flor
    history = []
    with flor.checkpointing(model=net):
        for epoch in flor.loop("epoch", range(3)):
            for x in flor.loop("step", data):
                train(net, x)
            history.append(evaluate(net))
            flor.log("best_so_far", max(history))
    """
    a = an(src)
    assert "history" in a.loop_carried
    need = a.need("best_so_far")
    assert need.kind == "outer"
    assert need.carried == ("history",)


def test_scheduler_step_in_tail_checkpointed_vs_not():
    checkpointed = """
    import flor_ray as flor
    with flor.checkpointing(model=model, optimizer=optimizer, scheduler=scheduler):
        for epoch in flor.loop("epoch", range(3)):
            for x in flor.loop("step", loader):
                optimizer.step()
            scheduler.step()
            flor.log("lr", scheduler.get_last_lr()[0])
    """
    a = an(checkpointed)
    assert a.need("lr").kind == "outer"
    assert a.need("lr").carried == ()
    assert a.loop_carried == ()
    b = an(checkpointed.replace(", scheduler=scheduler", ""))
    assert b.need("lr").kind == "outer"
    assert b.need("lr").carried == ("scheduler",)
    assert b.loop_carried == ("scheduler",)


# ---------------------------------------------------------------- functions, main(), aliases


def test_main_function_called_under_name_guard():
    src = """
    import flor_ray as flor

    def main():
        net = Net()
        flor.log("n_params", count(net))
        with flor.checkpointing(model=net):
            for epoch in flor.loop("epoch", range(3)):
                total = 0
                for x in flor.loop("step", data):
                    total += train(net, x)
                flor.log("total", total)
                flor.log("acc", evaluate(net))
        flor.log("final", evaluate(net))

    if __name__ == "__main__":
        main()
    """
    a = an(src)
    assert a.outer_loop == "epoch"
    assert a.checkpointed == ("net",)
    assert [(s.name, s.function, s.loop_path) for s in a.sites] == [
        ("n_params", "main", ()),
        ("total", "main", ("epoch",)),
        ("acc", "main", ("epoch",)),
        ("final", "main", ()),
    ]
    assert [a.need(n).kind for n in a.logged_names] == ["setup", "inner", "outer", "after"]


def test_log_inside_train_step_called_from_inner_loop():
    src = """
    import flor_ray as flor

    def train_step(model, batch):
        loss = model(batch)
        flor.log("loss", loss.item())
        return loss

    with flor.checkpointing(model=model):
        for epoch in flor.loop("epoch", range(3)):
            for batch in flor.loop("step", loader):
                loss = train_step(model, batch)
            flor.log("val", evaluate(model))
    """
    a = an(src)
    site = next(s for s in a.sites if s.name == "loss")
    assert site.function == "train_step"
    assert site.loop_path == ("epoch", "step")
    assert a.need("loss").kind == "inner"
    assert "train_step()" in a.need("loss").reason
    assert a.need("val").kind == "outer"


def test_log_inside_evaluate_called_in_tail_is_outer():
    src = """
    import flor_ray as flor

    def evaluate(model, loader):
        acc = score(model, loader)
        flor.log("val_acc", acc)
        return acc

    with flor.checkpointing(model=model):
        for epoch in flor.loop("epoch", range(3)):
            for batch in flor.loop("step", loader):
                train(model, batch)
            evaluate(model, val_loader)
    """
    a = an(src)
    site = a.sites[0]
    assert (site.function, site.loop_path) == ("evaluate", ("epoch",))
    assert a.need("val_acc").kind == "outer"


def test_function_called_from_two_loop_contexts_has_no_unique_path():
    src = """
    import flor_ray as flor

    def report(v):
        flor.log("v", v)

    for epoch in flor.loop("epoch", range(3)):
        for batch in flor.loop("step", loader):
            report(batch)
        report(epoch)
    """
    a = an(src)
    assert a.sites[0].loop_path is None
    assert a.need("v").kind == "inner"


def test_function_containing_inner_loop_and_reading_its_result():
    src = """
    import flor_ray as flor

    def train_epoch(model, loader):
        total = 0.0
        for batch in flor.loop("step", loader):
            total += model(batch)
            flor.log("loss", total)
        return total / len(loader)

    with flor.checkpointing(model=model):
        for epoch in flor.loop("epoch", range(3)):
            train_loss = train_epoch(model, loader)
            flor.log("train_loss", train_loss)
            flor.log("val", evaluate(model))
    """
    a = an(src)
    assert a.outer_loop == "epoch"
    loss_site = next(s for s in a.sites if s.name == "loss")
    assert loss_site.loop_path == ("epoch", "step")
    assert a.need("loss").kind == "inner"
    assert a.need("train_loss").kind == "inner"
    assert "train_epoch()" in a.need("train_loss").reason
    assert a.need("val").kind == "outer"


def test_uncalled_function_is_inner_with_reason():
    src = """
    import flor_ray as flor

    class Net:
        def forward(self, x):
            flor.log("act", x.mean())
            return x

    for epoch in flor.loop("epoch", range(3)):
        pass
    """
    a = an(src)
    assert a.sites[0].function == "forward"
    assert a.sites[0].loop_path is None
    need = a.need("act")
    assert need.kind == "inner" and "no call of forward()" in need.reason


def test_global_written_by_function_in_inner_loop():
    src = """
    import flor_ray as flor
    seen = 0

    def count(batch):
        global seen
        seen += len(batch)

    for epoch in flor.loop("epoch", range(3)):
        for batch in flor.loop("step", loader):
            count(batch)
        flor.log("seen", seen)
    """
    a = an(src)
    assert a.need("seen").kind == "inner"
    assert "seen" in a.loop_carried


@pytest.mark.parametrize(
    "header, log, loop, ckpt",
    [
        ("import flor_ray as fr", "fr.log", "fr.loop", "fr.checkpointing"),
        ("import flor_ray", "flor_ray.log", "flor_ray.loop", "flor_ray.checkpointing"),
        ("from flor_ray import log, loop, checkpointing", "log", "loop", "checkpointing"),
        ("from flor_ray import log as L, loop as LP, checkpointing as C", "L", "LP", "C"),
    ],
)
def test_import_aliases(header, log, loop, ckpt):
    src = f"""
    {header}
    with {ckpt}(model=net):
        for epoch in {loop}("epoch", range(3)):
            for x in {loop}("step", data):
                total = net(x)
                {log}("loss", total)
            {log}("acc", evaluate(net))
    """
    a = an(src)
    assert a.outer_loop == "epoch"
    assert a.checkpointed == ("net",)
    assert a.need("loss").kind == "inner"
    assert a.need("acc").kind == "outer"


def test_other_module_named_log_is_not_flor():
    src = """
    import math
    import flor_ray as flor
    for epoch in flor.loop("epoch", range(3)):
        flor.log("x", math.log(epoch + 1))
    """
    a = an(src)
    assert a.logged_names == ("x",)


# ---------------------------------------------------------------- several sites, control flow


def test_most_demanding_site_wins():
    src = """
    import flor_ray as flor
    with flor.checkpointing(model=net):
        flor.log("acc", 0.0)
        for epoch in flor.loop("epoch", range(3)):
            for x in flor.loop("step", data):
                flor.log("acc", batch_acc(net, x))
            flor.log("acc", evaluate(net))
    """
    need = an(src).need("acc")
    assert need.kind == "inner"
    assert "3 sites" in need.reason


def test_after_beats_outer_but_not_inner():
    src = """
    import flor_ray as flor
    with flor.checkpointing(model=net):
        for epoch in flor.loop("epoch", range(3)):
            for x in flor.loop("step", data):
                train(net, x)
            flor.log("acc", evaluate(net))
    flor.log("acc", evaluate(net))
    """
    assert kind(src, "acc") == "after"


def test_log_in_plain_loop_inside_outer_body_is_inner():
    src = """
    import flor_ray as flor
    for epoch in flor.loop("epoch", range(3)):
        for x in flor.loop("step", data):
            train(net, x)
        for name, p in net.named_parameters():
            flor.log("pnorm", p.norm())
    """
    need = an(src).need("pnorm")
    assert need.kind == "inner"
    assert "plain" in need.reason


def test_guard_condition_is_part_of_the_slice():
    src = """
    import flor_ray as flor
    for epoch in flor.loop("epoch", range(3)):
        for x in flor.loop("step", data):
            improved = check(x)
        if improved:
            flor.log("flag", 1)
    """
    need = an(src).need("flag")
    assert need.kind == "inner"
    assert "improved" in need.reads


def test_log_before_inner_loop_reading_previous_iteration_inner_value():
    src = """
    import flor_ray as flor
    last = None
    for epoch in flor.loop("epoch", range(3)):
        flor.log("prev", last)
        for x in flor.loop("step", data):
            last = x
    """
    need = an(src).need("prev")
    assert need.kind == "inner"
    assert need.carried == ("last",)


def test_outer_loop_without_inner_loop():
    src = """
    import flor_ray as flor
    with flor.checkpointing(model=net):
        for epoch in flor.loop("epoch", range(3)):
            loss = train_one_epoch(net)
            flor.log("loss", loss)
    """
    # the checkpoint is taken at the iteration's end: skip mode would train once more
    # from unrestored weights before reaching it, so the iteration re-executes
    need = an(src).need("loss")
    assert need.kind == "inner" and "in an iteration without inner loops" in need.reason


def test_no_flor_loop_at_all():
    a = an("import flor_ray as flor\nflor.log('x', 1)\n")
    assert a.outer_loop is None
    assert a.need("x").kind == "setup"


def test_dynamic_log_name_is_a_site_without_a_name():
    src = """
    import flor_ray as flor
    for epoch in flor.loop("epoch", range(3)):
        for k in ("a", "b"):
            flor.log(f"m_{k}", 1)
    """
    a = an(src)
    assert a.sites[0].name is None
    assert a.logged_names == ()


# ---------------------------------------------------------------- errors and values


def test_unknown_name_raises_query_and_key_error():
    a = an(BASIC)
    with pytest.raises(KeyError) as info:
        a.need("grad_norm")
    err = info.value
    assert isinstance(err, QueryError) and isinstance(err, FlorError)
    assert isinstance(err, UnknownLogNameError)
    assert "'grad_norm'" in str(err) and "'val_acc'" in str(err)


def test_syntax_error_is_a_planning_error():
    with pytest.raises(PlanningError, match="does not parse"):
        analyze("for x in :\n  pass\n", filename="train.py")


def test_result_is_frozen_and_picklable():
    a = an(BASIC)
    assert pickle.loads(pickle.dumps(a)) == a
    with pytest.raises(AttributeError):
        a.outer_loop = "x"  # type: ignore[misc]
    need = a.need("loss")
    assert isinstance(need, Need) and isinstance(a.sites[0], LogSite)
    with pytest.raises(AttributeError):
        need.kind = "outer"  # type: ignore[misc]


# ---------------------------------------------------------------- realistic scripts


CNN = """
import torch
import torch.nn as nn
import torch.nn.functional as F
import flor_ray as flor


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3)
        self.fc = nn.Linear(8 * 26 * 26, 10)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).flatten(1))


@torch.no_grad()
def evaluate(model, loader):
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += (model(x).argmax(1) == y).sum().item()
        total += y.numel()
    model.train()
    return correct / total


def main():
    lr = flor.arg("lr", 0.01)
    epochs = flor.arg("epochs", 5)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 2)
    flor.log("n_params", sum(p.numel() for p in model.parameters()))
    global_step = 0
    best = 0.0
    with flor.checkpointing(model=model, optimizer=optimizer, scheduler=scheduler):
        for epoch in flor.loop("epoch", range(epochs)):
            running, seen = 0.0, 0
            for x, y in flor.loop("step", train_loader):
                optimizer.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                grad_norm = nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                global_step += 1
                running += loss.item() * y.size(0)
                seen += y.size(0)
                if global_step % 100 == 0:
                    flor.log("loss", loss.item())
                flor.log("grad_norm", grad_norm.item())
            flor.log("train_loss", running / seen)
            acc = evaluate(model, val_loader)
            flor.log("val_acc", acc)
            best = max(best, acc)
            flor.log("best_acc", best)
            scheduler.step()
            flor.log("lr", scheduler.get_last_lr()[0])
            flor.log("last_weight_grad", model.fc.weight.grad.abs().mean().item())
    flor.log("test_acc", evaluate(model, test_loader))


if __name__ == "__main__":
    main()
"""


def test_realistic_cnn_script():
    a = analyze(CNN, filename="cnn.py")
    assert a.outer_loop == "epoch"
    assert a.checkpointed == ("model", "optimizer", "scheduler")
    assert a.loop_carried == ("best", "global_step")
    kinds = {n: a.need(n).kind for n in a.logged_names}
    assert kinds == {
        "n_params": "setup",
        "loss": "inner",
        "grad_norm": "inner",
        "train_loss": "inner",
        "val_acc": "outer",
        "best_acc": "outer",
        "lr": "outer",
        "last_weight_grad": "inner",
        "test_acc": "after",
    }
    assert a.need("loss").carried == ("global_step",)
    assert "global_step" in a.need("loss").reads
    assert a.need("best_acc").carried == ("best",)
    assert a.need("val_acc").carried == ()
    assert a.need("train_loss").carried == ()
    assert all(s.function == "main" for s in a.sites)


def _cases() -> list[Path]:
    return sorted(CASES.glob("*/*.py")) if CASES.is_dir() else []


@pytest.mark.skipif(not CASES.is_dir(), reason="shared propagation cases absent")
@pytest.mark.parametrize("path", _cases(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shared_cases_analyse(path: Path):
    a = analyze(path.read_text(), filename=str(path))
    assert a.outer_loop == "epoch"
    assert {"model", "optimizer"} <= set(a.checkpointed)
    for site in a.sites:
        if site.name is None:
            continue
        need = a.need(site.name)
        if site.loop_path == ("epoch", "step"):
            assert need.kind == "inner"
    # training at the outer level (no inner flor.loop): skip mode would train again from
    # unrestored weights before the end-of-iteration checkpoint, so such values re-execute
    trains_outside = path.read_text().count("flor.loop(") < 2
    for name in ("test_acc", "val_ppl", "val_loss", "val_acc", "val_bpc", "learning_rate"):
        if name in a.logged_names:
            assert a.need(name).kind == ("inner" if trains_outside else "outer"), name


@pytest.mark.skipif(not (CASES / "18_drift_train_step_extracted").is_dir(), reason="case absent")
def test_shared_case_train_step_extracted():
    a = analyze((CASES / "18_drift_train_step_extracted" / "source.py").read_text())
    need = a.need("train_loss")
    assert need.kind == "inner"
    assert "'running_loss'" in need.reason
    assert a.need("running_acc").kind == "inner"
    assert a.need("test_acc").kind == "outer"


def test_a_factory_parameter_bound_to_a_checkpointed_object_is_no_carried_value():
    src = """
    import flor_ray as flor

    def make_step(m, optimizer, counter):
        def train_step(x):
            optimizer.zero_grad()
            m(x).sum().backward()
            optimizer.step()
            counter.append(1)
        return train_step

    steps = []
    train_step = make_step(model, opt, steps)
    with flor.checkpointing(model=model, opt=opt):
        for epoch in flor.loop("epoch", range(3)):
            for x in flor.loop("step", loader):
                train_step(x)
            flor.log("wnorm", model.weight.norm().item())
    """
    a = an(src)
    # `optimizer` is `opt` (restored by the checkpoint); `counter` is the list `steps`,
    # which no checkpoint restores: it stays carried, named by the closure's parameter
    assert "optimizer" not in a.training_carried and "m" not in a.training_carried
    assert "counter" in a.training_carried


HELPER_STEP = """
import flor_ray as flor

def train_step(model, opt):
    opt.zero_grad()
    loss = model(X).sum()
    loss.backward()
    opt.step()
    return loss.item()

model = Net()
opt = make_opt(model)
with flor.checkpointing(model=model, opt=opt):
    for epoch in flor.loop("epoch", range(10)):
        loss = train_step(model, opt)
        last = evaluate(model)
        flor.log("loss", loss)
test_loss = evaluate(model)
flor.log("test_loss", test_loss)
flor.log("last_seen", last)
"""


def test_after_the_loop_a_model_a_helper_trained_is_the_last_checkpoints():
    """Skip mode restores the last iteration's checkpoint after its outer-level code ran
    (the training step in a helper): after the loop, the model is the checkpoint's."""
    need = an(HELPER_STEP).need("test_loss")
    assert need.kind == "after", need.reason
    # a value computed in the iteration before that restore is not: the iteration re-executes
    stale = an(HELPER_STEP).need("last_seen")
    assert stale.kind == "inner" and "reads the checkpointed 'model'" in stale.reason, stale.reason


def test_a_name_logged_in_the_loop_and_after_it_has_rows_each_iteration():
    src = HELPER_STEP.replace('flor.log("loss", loss)', 'flor.log("loss", loss)\n        flor.log("test_loss", float(epoch))')
    both = an(src).need("test_loss")
    assert both.kind == "after" and both.in_loop  # planned for every iteration and the end
    assert not an(HELPER_STEP).need("test_loss").in_loop  # the end alone
