"""Benchmark workloads: training scripts that look like real ones, on generated data.

Each workload has three versions that differ the way real histories do:

* ``v1``: the first version;
* ``v2``: the model variable renamed (``net``/``lm`` -> ``model``) and the train
  step extracted into a function;
* ``v3``: a learning-rate scheduler added (and checkpointed).

The files are flor_ray scripts (``import flor_ray as flor``); :func:`render` turns
one into a FlorDB 4.0.1 script (``import flordb as flor``, same verbs) and
:func:`today` adds the hindsight statements to the latest version:

* an outer-level statement (after the epoch's validation log) that reads only the
  model, so flor_ray can replay it from checkpoints without re-training;
* an inner-level statement (after ``opt.step()`` in the train step) that reads the
  gradients, so every replay must re-execute training.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["WORKLOADS", "VERSIONS", "source", "render", "today", "OUTER", "INNER"]

HERE = Path(__file__).resolve().parent
WORKLOADS = ("cnn", "lm")
VERSIONS = ("v1", "v2", "v3")

#: hindsight statement names per workload: (outer-level, inner-level)
OUTER = {"cnn": "wnorm", "lm": "emb_norm"}
INNER = {"cnn": "grad_norm", "lm": "grad_norm"}

_OUTER_STMT = {
    "cnn": 'flor.log("wnorm", sum(p.detach().norm() ** 2 for p in model.parameters()).item() ** 0.5)',
    "lm": 'flor.log("emb_norm", model.emb.weight.detach().norm().item())',
}
_INNER_STMT = 'flor.log("grad_norm", torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item())'
_OUTER_ANCHOR = {"cnn": '        flor.log("val_acc", acc)\n', "lm": '        flor.log("val_ppl", ppl)\n'}
_INNER_ANCHOR = "    opt.step()\n    return loss\n"


def source(workload: str, version: str) -> str:
    if workload not in WORKLOADS or version not in VERSIONS:
        raise ValueError(f"unknown workload/version {workload}/{version}; have {WORKLOADS} x {VERSIONS}")
    return (HERE / f"{workload}_{version}.py").read_text()


def render(src: str, tool: str = "flor_ray") -> str:
    """The script for ``tool``: ``flor_ray`` (as is) or ``flordb`` (FlorDB 4.0.1)."""
    if tool == "flor_ray":
        return src
    if tool == "flordb":
        out = src.replace("import flor_ray as flor\n", "import flordb as flor\n")
        assert out != src
        return out
    raise ValueError(f"tool must be flor_ray or flordb, got {tool!r}")


def today(workload: str, outer: bool = True, inner: bool = True) -> str:
    """The latest version (v3) with the hindsight statements typed in."""
    src = source(workload, "v3")
    if outer:
        a = _OUTER_ANCHOR[workload]
        assert a in src
        src = src.replace(a, a + "        " + _OUTER_STMT[workload] + "\n")
    if inner:
        assert _INNER_ANCHOR in src
        src = src.replace(_INNER_ANCHOR, "    opt.step()\n    " + _INNER_STMT + "\n    return loss\n")
    return src
