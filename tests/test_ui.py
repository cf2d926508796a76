"""`flor-ray ui`: its JSON endpoints and its page in a real headless Chromium, over a
store of real recorded runs with values back-filled by a real replay."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

import flor_ray
from conftest import TRAIN_SCRIPT, clean_env, git, init_repo, run_script, write
from flor_ray.execution.driver import LocalRunner, run_plan
from flor_ray.planning.plan import ClusterSnapshot
from flor_ray.store import Store
from flor_ray.ui.server import make_server

WNORM = '    flor.log("wnorm", net[0].weight.norm().item())\n'
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _today(script: str) -> str:
    """TRAIN_SCRIPT with an epoch-level statement nobody recorded, after the acc log."""
    anchor = '        flor.log("acc", acc)\n'
    assert anchor in script
    return script.replace(anchor, anchor + "    " + WNORM)


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    """Two versions recorded (lr 0.05 and 0.1, 3 epochs), then wnorm back-filled into both."""
    repo = tmp_path_factory.mktemp("ui") / "proj"
    repo.mkdir()
    init_repo(repo)
    write(repo, "train.py", TRAIN_SCRIPT)
    git(repo, "add", "train.py")
    git(repo, "commit", "-qm", "v1")
    run_script(repo, "train.py", "--kwargs", "epochs=3")
    write(repo, "train.py", TRAIN_SCRIPT.replace("nn.Dropout(0.2)", "nn.Dropout(0.1)"))
    git(repo, "commit", "-qam", "v2: less dropout")
    run_script(repo, "train.py", "--kwargs", "epochs=3", "lr=0.1")
    write(repo, "train.py", _today(TRAIN_SCRIPT.replace("nn.Dropout(0.2)", "nn.Dropout(0.1)")))
    store = Store(str(repo / ".flor"))
    plan = flor_ray.plan_replay(["wnorm"], store=store, script=repo / "train.py", cluster=ClusterSnapshot(1))
    report = run_plan(plan, progress=False, runner=LocalRunner())
    assert not report.failed, str(report)
    return repo, store


@pytest.fixture(scope="module")
def ui(history):
    repo, store = history
    srv = make_server(store, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def fetch(url: str, data: dict | None = None, headers: dict | None = None) -> tuple[int, dict, dict]:
    req = urllib.request.Request(url, data=None if data is None else json.dumps(data).encode(),
                                 headers=headers or {}, method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def api(srv, endpoint: str, **params) -> tuple[int, dict]:
    qs = ("?" + urllib.parse.urlencode(params)) if params else ""
    status, body, _ = fetch(f"http://127.0.0.1:{srv.port}{endpoint}{qs}")
    return status, body


# ------------------------------------------------------------------ endpoints
def test_runs_endpoint_lists_runs_with_names_and_filters_like_the_cli(ui, history):
    _, store = history
    status, body = api(ui, "/api/runs")
    assert status == 200
    cli_runs = flor_ray.runs(store=store)
    assert [r["run_id"] for r in body["runs"]] == list(cli_runs["run_id"])
    assert {"lr", "epochs"} <= set(body["args"])
    for r in body["runs"]:
        assert r["status"] == "finished" and r["iterations"] == 3 and r["duration_s"] > 0
        assert r["recorded"] == ["acc", "loss"] and r["replayed"] == ["wnorm"]
        assert r["recomputed"] == ["acc"]  # the replay's fidelity check recomputed acc
    assert body["names"] == ["acc", "loss", "wnorm"]
    status, body = api(ui, "/api/runs", where="lr > 0.07")
    assert status == 200
    assert [r["run_id"] for r in body["runs"]] == list(flor_ray.runs(where="lr > 0.07", store=store)["run_id"])
    assert [r["args"]["lr"] for r in body["runs"]] == [0.1]


def test_bad_where_is_a_400_that_names_the_columns(ui):
    status, body = api(ui, "/api/runs", where="learning_rate > 1")
    assert status == 400
    assert "invalid where predicate" in body["error"] and "learning_rate" in body["error"]
    assert "lr" in body["error"]  # the runs table's columns are listed
    status, body = api(ui, "/api/series", name="acc", where="lr >")
    assert status == 400 and "invalid where predicate" in body["error"]


def test_series_per_run_and_version_recorded_and_backfilled(ui, history):
    _, store = history
    status, body = api(ui, "/api/series", name="acc")
    assert status == 200
    df = flor_ray.dataframe("acc", store=store)
    got = {s["key"]: s for s in body["series"]}
    for rid, part in df.groupby("run_id"):
        s = got[f"{rid}:record"]
        assert s["source"] == "record" and s["x"] == [0.0, 1.0, 2.0]
        assert s["y"] == list(part.sort_values("epoch")["acc"])
    # back-filled values are their own series, from the replayed rows
    status, body = api(ui, "/api/series", name="wnorm")
    wn = flor_ray.dataframe("wnorm", store=store)
    assert {s["source"] for s in body["series"]} == {"replay"}
    for s in body["series"]:
        rid = s["key"].split(":")[0]
        assert s["y"] == list(wn[wn["run_id"] == rid].sort_values("epoch")["wnorm"]) and "back-filled" in s["label"]
    # step-level loss: averaged per epoch, or every step at epoch + k/6
    _, agg = api(ui, "/api/series", name="loss")
    _, raw = api(ui, "/api/series", name="loss", raw="1")
    loss = flor_ray.dataframe("loss", store=store)
    first = loss["run_id"].iloc[0]
    a = next(s for s in agg["series"] if s["key"] == f"{first}:record")
    r = next(s for s in raw["series"] if s["key"] == f"{first}:record")
    mine = loss[loss["run_id"] == first]
    assert a["y"] == pytest.approx(list(mine.groupby("epoch")["loss"].mean()), rel=1e-12)
    assert len(r["x"]) == len(mine) == 18 and r["x"][:3] == pytest.approx([0, 1 / 6, 2 / 6])
    assert r["y"] == list(mine.sort_values(["epoch", "step"])["loss"])
    _, by_v = api(ui, "/api/series", name="acc", by="version")
    assert [s["source"] for s in by_v["series"]] == ["record", "replay"] * 2  # acc recomputed by the replay
    assert all(s["label"].startswith("version ") for s in by_v["series"])
    rec, rep = by_v["series"][:2]
    assert rec["y"] == rep["y"]  # the replay reproduced the recorded values exactly
    assert api(ui, "/api/series", name="acc", where="lr > 0.07")[1]["series"][0]["key"].startswith(
        tuple(flor_ray.runs(where="lr > 0.07", store=store)["run_id"]))


def test_unknown_names_runs_and_pages_are_404s(ui):
    status, body = api(ui, "/api/series", name="nothing_like_it")
    assert status == 404 and "nothing_like_it" in body["error"] and "acc" in body["error"]
    status, body = api(ui, "/api/run/20200101T000000-000000")
    assert status == 404 and "no run" in body["error"]
    assert api(ui, "/api/replays/20200101T000000-nope")[0] == 404
    assert api(ui, "/api/nope")[0] == 404
    status, body = api(ui, "/api/run/..")
    assert status == 400 and "run id" in body["error"]
    status, body = api(ui, "/api/series", name="acc", by="week")
    assert status == 400 and "by must be" in body["error"]


def test_run_detail_diff_file_and_replay_history(ui, history):
    repo, store = history
    runs = api(ui, "/api/runs")[1]["runs"]
    first, second = runs[0]["run_id"], runs[1]["run_id"]
    status, d = api(ui, f"/api/run/{first}")
    assert status == 200
    assert d["meta"]["args"] == {"lr": 0.05, "epochs": 3} and d["meta"]["env"]["torch"]
    # the period adapts to the checkpoint budget: which epochs have one depends on the machine
    on_disk = store.read_json(store.runs_rel(first))["checkpoints"]
    assert d["meta"]["checkpoints"] == on_disk and on_disk and on_disk[0]["iteration"] == 0
    assert {(n["source"], n["name"]): n["rows"] for n in d["names"]} == {
        ("record", "acc"): 3, ("record", "loss"): 18, ("replay", "wnorm"): 3, ("replay", "acc"): 3}
    assert d["files"] == ["train.py"]
    assert len(d["replays"]) == 1 and d["replays"][0]["names"] == ["acc", "wnorm"]
    status, f = api(ui, f"/api/run/{first}/file", path="train.py")
    assert f["text"] == git(repo, "show", "HEAD~1:train.py")
    status, diff = api(ui, f"/api/run/{second}/diff", against=first)
    assert status == 200 and [x["path"] for x in diff["files"]] == ["train.py"]
    assert "\n-net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2)" in diff["files"][0]["diff"]
    assert "\n+net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1)" in diff["files"][0]["diff"]
    status, reps = api(ui, "/api/replays")
    (rep,) = reps["replays"]
    assert sorted(rep["runs"]) == sorted([first, second]) and rep["tasks"] >= 2 and rep["actual_s"] > 0
    status, one = api(ui, f"/api/replays/{rep['id']}")
    assert status == 200 and {t["run_id"] for t in one["task_list"]} == {first, second}
    status, pc = api(ui, "/api/parallel", metric="acc")
    df = flor_ray.dataframe("acc", store=store)
    last = df.sort_values("epoch").groupby("run_id")["acc"].last()
    assert {r["run_id"]: r["value"] for r in pc["runs"]} == last.to_dict()


def test_replay_from_the_page_needs_the_token_and_plans_before_it_runs(ui, history):
    repo, _ = history
    base = f"http://127.0.0.1:{ui.port}"
    body = {"names": ["wnorm"], "script": str(repo / "train.py")}
    status, err, _ = fetch(base + "/api/jobs", body)  # a cross-site form has no token
    assert status == 403 and "token" in err["error"]
    tok = {"X-Flor-Token": ui.token, "Content-Type": "application/json"}
    status, job, _ = fetch(base + "/api/jobs", body, tok)
    assert status == 200 and job["state"] == "planned"
    assert "wnorm" in job["explain"] and job["tasks_total"] >= 2 and job["tasks_pending"] == 0  # done before
    status, job, _ = fetch(base + f"/api/jobs/{job['id']}/start", {}, tok)
    assert status == 200 and job["state"] in ("running", "finished")
    deadline = time.time() + 30
    while job["state"] == "running" and time.time() < deadline:
        time.sleep(0.2)
        job = api(ui, f"/api/jobs/{job['id']}")[1]
    assert job["state"] == "finished", job
    assert {r["status"] for r in job["report"]["results"]} == {"skipped"} and job["report"]["ok"]
    status, again, _ = fetch(base + f"/api/jobs/{job['id']}/start", {}, tok)
    assert status == 400 and "plan it again" in again["error"]
    status, bad, _ = fetch(base + "/api/jobs", {"names": ["wnorm"], "where": "zz > 1"}, tok)
    assert status == 400 and "zz" in bad["error"]


def test_a_non_loopback_bind_requires_the_token(history):
    _, store = history
    srv = make_server(store, "0.0.0.0", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{srv.port}"
        assert "?token=" in srv.url and srv.token in srv.url
        for path in ("/", "/api/runs", "/static/app.js"):
            status, body, _ = fetch(base + path)
            assert status == 403 and "token" in body["error"]
        assert fetch(base + "/api/runs?token=" + "x" * len(srv.token))[0] == 403
        status, body, headers = fetch(base + "/api/runs?token=" + srv.token)
        assert status == 200 and len(body["runs"]) == 2
        cookie = headers["Set-Cookie"].split(";")[0]
        assert "HttpOnly" in headers["Set-Cookie"]
        assert fetch(base + "/api/runs", headers={"Cookie": cookie})[0] == 200
        assert fetch(base + "/api/runs", headers={"X-Flor-Token": srv.token})[0] == 200
    finally:
        srv.shutdown()
        srv.server_close()


def test_loopback_refuses_foreign_host_names(ui):
    # a page elsewhere that rebinds its own name to 127.0.0.1 sends its name as Host
    status, body, _ = fetch(f"http://127.0.0.1:{ui.port}/api/runs", headers={"Host": "evil.example:80"})
    assert status == 403
    status, body, _ = fetch(f"http://127.0.0.1:{ui.port}/api/runs", headers={"Host": f"localhost:{ui.port}"})
    assert status == 200


def test_ui_command_help_and_import_stays_light():
    out = subprocess.run([sys.executable, "-m", "flor_ray.cli", "ui", "--help"], capture_output=True, text=True,
                         env=clean_env(), check=True).stdout
    assert out.startswith("usage: flor-ray ui") and "--host" in out and "token" in out
    code = "import sys, flor_ray.ui.server; print(sorted(m for m in ('pandas', 'duckdb', 'ray', 'torch', 'pyarrow') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean_env(),
                          check=True).stdout.strip() == "[]"


def test_ui_command_serves_the_store_and_prints_the_token_url(history):
    _, store = history
    proc = subprocess.Popen([sys.executable, "-m", "flor_ray.cli", "ui", "--store", store.url, "--host", "0.0.0.0",
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    try:
        first = proc.stdout.readline()
        assert first.startswith("flor-ray ui: http://") and "?token=" in first, first + proc.stderr.read()
        url = urllib.parse.urlsplit(first.split()[2])
        base = f"http://127.0.0.1:{url.port}"
        assert "non-loopback" in proc.stdout.readline()
        assert fetch(base + "/api/runs")[0] == 403
        status, body, _ = fetch(f"{base}/api/runs?{url.query}")
        assert status == 200 and body["total"] == 2
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# -------------------------------------------------------------------- browser
def _browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("the selenium package")
    if missing:
        pytest.fail(f"the browser test needs {', '.join(missing)}: `apt-get install -y chromium chromium-driver` "
                    "and `pip install -e '.[test]'` (which has selenium); .ci/run installs them", pytrace=False)
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1360,1000"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def _wait(driver, what, timeout=20):
    """Until ``what(driver)`` is truthy; a view being redrawn (elements gone or replaced) is waited out."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1,
                         ignored_exceptions=(NoSuchElementException, StaleElementReferenceException, IndexError)
                         ).until(lambda d: what(d))


@pytest.fixture(scope="module")
def browser():
    driver = _browser()
    yield driver
    driver.quit()


@pytest.mark.browser
@pytest.mark.slow
def test_page_runs_table_run_page_and_chart(browser, ui, history, tmp_path):  # a missing browser fails first
    from selenium.webdriver.common.by import By

    _, store = history
    d = browser
    d.get(f"http://127.0.0.1:{ui.port}/")
    rows = _wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#runs tbody tr"))
    ids = list(flor_ray.runs(store=store)["run_id"])
    assert [r.get_attribute("data-run") for r in rows] == ids
    assert [c.text for c in rows[1].find_elements(By.CSS_SELECTOR, "td.names-rep .chip")] == ["wnorm"]
    # sort by lr, descending: the lr=0.1 run comes first
    head = d.find_element(By.CSS_SELECTOR, "th[data-col='arg:lr']")
    head.click()
    _wait(d, lambda d: "▴" in d.find_element(By.CSS_SELECTOR, "th[data-col='arg:lr']").text)
    d.find_element(By.CSS_SELECTOR, "th[data-col='arg:lr']").click()
    _wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#runs tbody tr")[0].get_attribute("data-run") == ids[1])
    # filter with a where predicate
    box = d.find_element(By.ID, "where")
    box.clear()
    box.send_keys("lr < 0.07")
    d.find_element(By.ID, "apply-where").click()
    _wait(d, lambda d: d.find_element(By.ID, "runs-count").text == "1 runs")
    # a run page shows the run's args and its code
    d.find_element(By.CSS_SELECTOR, "#runs tbody tr a.run-link").click()
    args = _wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#run-args tr"))
    assert {tuple(td.text for td in tr.find_elements(By.TAG_NAME, "td")) for tr in args} == {("lr", "0.05"), ("epochs", "3")}
    assert d.find_element(By.ID, "run-id").text == ids[0]
    _wait(d, lambda d: "flor.checkpointing" in d.find_element(By.ID, "code-text").text)
    ckpts = store.read_json(store.runs_rel(ids[0]))["checkpoints"]
    assert len(d.find_elements(By.CSS_SELECTOR, "#run-checkpoints tr")) == 1 + len(ckpts)
    # a chart of a name: one recorded series per run, drawn on a canvas
    d.find_element(By.CSS_SELECTOR, "nav a[data-nav='chart']").click()
    sel = _wait(d, lambda d: d.find_element(By.ID, "chart-name"))
    from selenium.webdriver.support.ui import Select

    Select(sel).select_by_visible_text("acc")
    chart = _wait(d, lambda d: d.find_element(By.CSS_SELECTOR, "#chart[data-recorded='2']"))
    assert chart.find_element(By.CSS_SELECTOR, ".uplot canvas").size["width"] > 400
    labels = [e.text for e in chart.find_elements(By.CSS_SELECTOR, ".u-legend .u-series .u-label")]
    # (the legend in run id order, the table in start order: two runs may start in one second)
    assert sorted(l for l in labels if l in ids) == sorted(ids)
    Select(d.find_element(By.ID, "chart-name")).select_by_visible_text("wnorm")
    _wait(d, lambda d: d.find_element(By.CSS_SELECTOR, "#chart[data-replayed='2'][data-recorded='0']"))
    d.save_screenshot(str(tmp_path / "chart.png"))
    assert (tmp_path / "chart.png").stat().st_size > 10_000


@pytest.mark.browser
@pytest.mark.slow
def test_page_replay_history_and_a_replay_planned_then_started(browser, ui, history):
    from selenium.webdriver.common.by import By

    repo, store = history
    d = browser
    d.get(f"http://127.0.0.1:{ui.port}/#/replays")
    rows = _wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#replays tr td a"))
    assert len(rows) == len(store.find("replays", ".json"))
    d.find_element(By.ID, "replay-names").send_keys("wnorm")
    d.find_element(By.ID, "replay-script").send_keys(str(repo / "train.py"))
    d.find_element(By.ID, "replay-plan").click()
    explain = _wait(d, lambda d: d.find_element(By.ID, "job-explain").text)
    assert explain.startswith("ReplayPlan[names=wnorm") and "[done]" in explain  # the dry run: nothing ran
    assert "planned" in d.find_element(By.ID, "job-state").text
    d.find_element(By.ID, "replay-start").click()
    fid = _wait(d, lambda d: d.find_element(By.ID, "job-fidelity").text)
    assert fid.endswith("0 mismatched") and "finished" in d.find_element(By.ID, "job-state").text
    statuses = [td.text for td in d.find_elements(By.CSS_SELECTOR, "#job-results tr td:nth-child(3)")]
    assert statuses and set(statuses) == {"skipped"}  # every segment was already back-filled


# a second, lighter training script of the project (numpy only: the recording is what is timed here)
SGD_SCRIPT = """
import argparse

import numpy as np

import flor_ray as flor


def batches(x, y, size, rng):
    order = rng.permutation(len(x))
    for i in range(0, len(x), size):
        yield x[order[i:i + size]], y[order[i:i + size]]


parser = argparse.ArgumentParser()
parser.add_argument("--kwargs", nargs="*")
parser.parse_args()
rng = np.random.default_rng(0)
x = rng.normal(size=(256, 4))
y = x @ np.array([1.0, -2.0, 0.5, 3.0]) + 0.1 * rng.normal(size=256)
w = np.zeros(4)
lr = flor.arg("lr", 0.05)
for epoch in flor.loop("epoch", range(flor.arg("epochs", 3))):
    for xb, yb in flor.loop("step", batches(x, y, 32, rng)):
        err = xb @ w - yb
        w -= lr * xb.T @ err / len(xb)
        flor.log("mse", float(err @ err / len(xb)))
    lr *= 0.7
    flor.log("w_dist", float(np.linalg.norm(w - np.array([1.0, -2.0, 0.5, 3.0]))))
"""


@pytest.mark.browser
@pytest.mark.slow
def test_page_follows_a_run_recorded_while_it_is_open(browser, history, tmp_path):
    """A copy of the store; a run recorded while the page is open appears without a reload."""
    from selenium.webdriver.common.by import By

    repo, _ = history
    copy = tmp_path / "proj"
    shutil.copytree(repo, copy)
    srv = make_server(Store(str(copy / ".flor")), "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        browser.get(f"http://127.0.0.1:{srv.port}/")
        _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#runs tbody tr")) == 2)
        write(copy, "sgd.py", SGD_SCRIPT)
        run_script(copy, "sgd.py", "--kwargs", "lr=0.2")
        rows = _wait(browser, lambda d: (r := d.find_elements(By.CSS_SELECTOR, "#runs tbody tr")) and len(r) == 3 and r)
        assert "sgd.py" in rows[2].text and "0.2" in rows[2].text
        assert [c.text for c in rows[2].find_elements(By.CSS_SELECTOR, "td.names-rec .chip")] == ["mse", "w_dist"]
    finally:
        srv.shutdown()
        srv.server_close()
