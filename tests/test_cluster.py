"""Replay on a real two-node Ray cluster (two network namespaces), store on S3.

Proves that a replay needs only the store URL and the AWS_* environment: the runs
are recorded into ``s3://`` from the head's namespace, then a driver in ns1 and a
``ray job submit`` of ``flor-ray replay`` back-fill new statements with tasks that
land on both nodes (10.213.0.1 and 10.213.0.2) and read/write the same S3 store.
"""

from __future__ import annotations

import json
import sys

import pytest

from cluster_util import HEAD_IP, WORKER_IP, Cluster, netns_unavailable
from conftest import clean_env, git
from test_faults import EPOCHS, KS, RECORDED, splittable, today

pytestmark = pytest.mark.slow

DRIVER = """
import json, sys
import ray
import flor_ray
from flor_ray.execution.driver import ensure_ray, run_plan
from flor_ray.planning.plan import ClusterSnapshot

ensure_ray()  # RAY_ADDRESS from the environment
plan = flor_ray.plan_replay(["n2"], script=sys.argv[1], cluster=ClusterSnapshot(8.0),  # store: FLOR_STORE
                            resources={"num_cpus": 1})  # one CPU per task, whatever threads the runs had
report = run_plan(plan, progress=False)
from ray.util.state import list_tasks
ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
where = {}
for t in list_tasks(limit=10000, detail=True, raise_on_missing_output=False):
    if t.name.startswith("flor-replay-") and t.node_id:
        where.setdefault(t.name[len("flor-replay-"):], set()).add(ips.get(t.node_id))
print("RESULT " + json.dumps({"ok": report.ok, "tasks": len(plan.tasks),
      "results": [[r.key, r.status, r.rows, r.error] for r in report.results],
      "nodes": sorted({str(ip) for r in report.results for ip in where.get(r.key[:12], {None})}), "alive": len(ips)}))
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = netns_unavailable()
    if why:
        pytest.skip(why)
    base = tmp_path_factory.mktemp("cluster")
    with Cluster(base, clean_env()) as c:
        yield c


def test_replay_on_two_nodes_with_s3_store(cluster, tmp_path_factory):
    faults = tmp_path_factory.mktemp("nofaults")
    repo = tmp_path_factory.mktemp("clusterrepo") / "proj"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "train.py").write_text(RECORDED.format(faults=str(faults), epochs=EPOCHS))
    url = "s3://flor-cluster/prefix"
    for k in KS:
        cluster.run(cluster.ns1, sys.executable, "train.py", "--kwargs", f"k={k}", cwd=repo,
                    FLOR_STORE=url, FLOR_CHECKPOINT_MAX_PERIOD="1")
    # the planner would keep each toy run in one task; give it timings worth splitting
    cluster.run(cluster.ns1, sys.executable, "-c",
                "import sys; sys.path.insert(0, sys.argv[1]); from test_faults import splittable;"
                "from flor_ray.store import Store; splittable(Store(sys.argv[2]))",
                str(__import__("pathlib").Path(__file__).parent), url, cwd=repo)
    (repo / "train.py").write_text(today((repo / "train.py").read_text()))
    (repo.parent / "driver.py").write_text(DRIVER)
    out = cluster.run(cluster.ns1, sys.executable, str(repo.parent / "driver.py"), str(repo / "train.py"),
                      cwd=repo, FLOR_STORE=url, RAY_ADDRESS=f"{HEAD_IP}:6379", timeout=300).stdout
    res = json.loads(out.split("RESULT ", 1)[1])
    assert res["ok"] and res["alive"] == 2, res
    assert all(s == "done" for _, s, _, _ in res["results"]) and len(res["results"]) >= 4, res
    assert res["nodes"] == [HEAD_IP, WORKER_IP], res  # tasks ran on both nodes

    # the same through `ray job submit` of the CLI (token auth on), a new statement
    (repo / "train.py").write_text((repo / "train.py").read_text().replace(
        'flor.log("n2", c.n * 2)', 'flor.log("n2", c.n * 2)\n        flor.log("n3", c.n * 3)'))
    renv = {"env_vars": {"FLOR_STORE": url, "AWS_ENDPOINT_URL": cluster.s3_endpoint, "AWS_ACCESS_KEY_ID": "test",
                         "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}}
    job = cluster.run(cluster.ns1, "ray", "job", "submit", "--address", f"http://{HEAD_IP}:8265",
                      "--runtime-env-json", json.dumps(renv), "--",
                      sys.executable, "-m", "flor_ray.cli", "replay", "n3", "--script", str(repo / "train.py"),
                      "--quiet", cwd=repo, timeout=300, check=False)
    assert job.returncode == 0 and "succeeded" in job.stdout, job.stdout + job.stderr
    assert "failed" not in job.stdout.split("replay:", 1)[1].split(";")[0] or "0 failed" in job.stdout, job.stdout

    # every row once, read back from S3 through the head's namespace
    check = cluster.run(cluster.ns1, sys.executable, "-c", (
        "import flor_ray, json; df = flor_ray.dataframe('n', 'n2', 'n3');"
        "print('ROWS ' + json.dumps(sorted([int(k), int(e), int(a), int(b), int(c)] "
        "for k, e, a, b, c in zip(df['k'], df['epoch'], df['n'], df['n2'], df['n3']))))"),
        cwd=repo, FLOR_STORE=url).stdout
    rows = json.loads(check.split("ROWS ", 1)[1])
    assert rows == sorted([k, e, 3 * k * (e + 1), 6 * k * (e + 1), 9 * k * (e + 1)] for k in KS for e in range(EPOCHS))
