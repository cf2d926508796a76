"""The plan is a value handed to an executor: the task spec that crosses the Ray
boundary, the kind of a skipped run, and the one-way imports planning -> execution."""

from __future__ import annotations

import ast
import dataclasses
import json

import pytest

from flor_ray.errors import PlanningError
from flor_ray.execution.spec import SPEC_FORMAT, TaskSpec
from flor_ray.planning.make import make_plan
from flor_ray.planning.plan import CheckpointRef, ClusterSnapshot, RunInfo, SkipKind, VersionPatch

from conftest import REPO_ROOT

PATCH = VersionPatch("v1", "code", None, (), (("wnorm", "outer", "outer level", ()),
                                                ("gnorm", "inner", "in the step loop", ())), ("wnorm", "gnorm"))


def _run(rid: str, n: int = 5, ckpts=(0, 2, 4)) -> RunInfo:
    return RunInfo(
        run_id=rid, version="v1", script="train.py", args=(("lr", 0.1), ("tag", "a b")), argv=("--lr", "0.1"),
        cwd=".", iterations=n, setup_s=2.0, outer_s=(10.0,) * n, inner_s=(9.0,) * n,
        checkpoints=tuple(CheckpointRef(i, 1, f"checkpoints/{rid}/{i:06d}.pt", 1000, "x") for i in ckpts),
        numerics={"torch_threads": 2},
    )


def _plan(names, iterations="all", runs=None):
    return make_plan(names=names, where=None, iterations=iterations, runs=runs or [_run("r1")],
                     patches={"v1": PATCH}, cluster=ClusterSnapshot(2), store_url="memory://seam",
                     storage_options={"key": "AKIA-secret", "client_kwargs": {"region_name": "x"}})


@pytest.mark.parametrize("names", [["wnorm"], ["gnorm"]])
def test_task_spec_round_trips_through_json_without_secrets(names):
    plan = _plan(names)
    assert plan.pending
    for task in plan.pending:
        spec = TaskSpec.of(plan, task)
        text = spec.to_json()
        assert "AKIA-secret" not in text and json.loads(text)["format"] == SPEC_FORMAT
        back = TaskSpec.from_json(text)
        assert back == spec
        assert (back.task, back.mode, back.start, back.stop, back.output) == (
            task.key, task.mode, task.start, task.stop, task.output)
        assert back.iterations == task.iterations and back.names == task.names
        assert back.checkpoints == {c.iteration: c.as_dict() for c in task.checkpoints}
        assert all(e["iteration"] < task.stop for e in back.fallbacks)
        assert back.storage_options == {"client_kwargs": {"region_name": "x"}}


def test_task_spec_of_another_format_is_refused_with_what_to_do():
    spec = TaskSpec.of(_plan(["wnorm"]), _plan(["wnorm"]).pending[0])
    doc = json.loads(spec.to_json())
    doc["format"] = SPEC_FORMAT + 1
    with pytest.raises(ValueError, match="different flor_ray versions; install the same one"):
        TaskSpec.from_json(json.dumps(doc))


def test_skipped_runs_carry_their_kind():
    bare = VersionPatch("v2", None, "cannot read train.py of this version")
    runs = [_run("r1"), dataclasses.replace(_run("r2"), version="v2"), dataclasses.replace(_run("r3"), iterations=0)]
    plan = make_plan(names=["wnorm"], where=None, iterations="all", runs=runs, patches={"v1": PATCH, "v2": bare},
                     cluster=ClusterSnapshot(2))
    assert {s.run_id: s.kind for s in plan.skipped} == {"r2": SkipKind.PROPAGATION_FAILED,
                                                         "r3": SkipKind.NO_ITERATIONS}
    out = _plan(["wnorm"], iterations=[7])
    assert not out.tasks and [s.kind for s in out.skipped] == [SkipKind.OUT_OF_RANGE]
    assert "selects none of its iterations" in out.skipped[0].reason


def test_planning_imports_neither_execution_nor_api():
    """Every import of the planning package, function-level ones too (TYPE_CHECKING aside)."""
    found = []
    for path in sorted((REPO_ROOT / "flor_ray" / "planning").glob("*.py")):
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for b in ast.walk(tree) if isinstance(b, ast.If) and "TYPE_CHECKING" in ast.unparse(b.test)
                       for n in ast.walk(b)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and id(node) not in typing_only:
                mod = ("." * node.level) + (node.module or "")
                if mod.lstrip(".").split(".")[0] in ("execution", "api") and node.level == 2 or \
                        mod.startswith(("flor_ray.execution", "flor_ray.api")):
                    found.append(f"{path.name}:{node.lineno} {mod}")
    assert found == []
