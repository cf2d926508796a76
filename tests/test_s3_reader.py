"""The lean S3 reader (flor_ray/store/s3read.py): its signatures are botocore's, it is
used only where it can be faithful, and a store read through it answers every read
command exactly as s3fs does, in no more requests, without importing s3fs at all."""

from __future__ import annotations

import datetime as dt
import http.server
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import flor_ray
from flor_ray.errors import StoreError
from flor_ray.queries.cache import CACHE
from flor_ray.store import Store, damage, layout
from flor_ray.store.consolidation import consolidate
from flor_ray.store.listing import list_files
from flor_ray.store.s3read import Credentials, S3Reader, for_store, sign

from conftest import REPO_ROOT, S3, Counting, git, write

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import bench_store  # noqa: E402

pytest.importorskip("moto.server")
pytest.importorskip("s3fs")

BUCKET = "flor-lean"
URL = f"s3://{BUCKET}/store"


# ------------------------------------------------------------------ signing
SIGNED = [
    # method, key, query, extra headers, token, region, virtual-hosted
    ("GET", "store/logs/run=a b/part-0001.parquet", {}, {"range": "bytes=-1048576"}, None, "us-east-1", False),
    ("HEAD", "store/runs/ünïcode é+%/x.json", {}, {}, "FwoGZXIvYXdzE//token+/=", "eu-west-3", True),
    ("GET", "", {"list-type": "2", "prefix": "store/a b/ü+=&?/", "delimiter": "/",
                 "continuation-token": "1ueGcxLPRx1Tr/XYExHnhbYLgveDs2J/wm36Hy4vbOwM=", "max-keys": "1"},
     {}, None, "ap-south-1", True),
    ("GET", "store/~tilde/(paren)!*'/k", {}, {"range": "bytes=17-4095"}, "tok", "us-west-2", False),
]


@pytest.mark.parametrize("method,key,params,headers,token,region,virtual", SIGNED)
def test_signature_equals_botocores(monkeypatch, method, key, params, headers, token, region, virtual):
    from botocore import auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials as BotoCredentials
    from botocore.utils import percent_encode

    when = dt.datetime(2026, 3, 9, 23, 59, 58)
    monkeypatch.setattr(auth, "get_current_datetime", lambda: when)
    creds = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token)
    reader = S3Reader(creds, None if virtual else "https://minio.example.com:9000", region, 1, 1)
    scheme, host, path, _ = reader._where(BUCKET, key)
    # the key's encoding in the URL is botocore's serializer's
    want_path = f"/{percent_encode(key, safe='/~')}" if virtual else f"/{BUCKET}/{percent_encode(key, safe='/~')}"
    assert path == want_path

    ours = sign(method, host, path, params, headers, creds, region, when.strftime("%Y%m%dT%H%M%SZ"))
    req = AWSRequest(method=method, url=f"{scheme}://{host}{path}", headers={**headers, "host": host}, params=params)
    auth.S3SigV4Auth(BotoCredentials(creds.access_key, creds.secret_key, token), "s3", region).add_auth(req)
    assert ours["authorization"] == req.headers["Authorization"]
    assert ours["x-amz-date"] == req.headers["X-Amz-Date"]
    assert ours.get("x-amz-security-token") == req.headers.get("X-Amz-Security-Token")


# ------------------------------------------------------------ which path
def _files(tmp_path: Path, credentials: str = "", config: str = "") -> dict:
    (tmp_path / "credentials").write_text(credentials)
    (tmp_path / "config").write_text(config)
    return {"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "credentials"), "AWS_CONFIG_FILE": str(tmp_path / "config")}


def test_lean_reader_only_where_it_can_be_faithful(tmp_path):
    files = _files(tmp_path)
    env = {**files, "AWS_ACCESS_KEY_ID": "ak", "AWS_SECRET_ACCESS_KEY": "sk", "AWS_REGION": "eu-west-1"}
    r = for_store(URL, {}, env)
    assert (r.creds, r.endpoint, r.region) == (Credentials("ak", "sk"), None, "eu-west-1")
    opts = {"key": "k", "secret": "s", "token": "t", "client_kwargs": {"endpoint_url": "http://h:9", "region_name": "r"}}
    r = for_store(URL, opts, env)  # the options win over the environment
    assert (r.creds, r.endpoint, r.region) == (Credentials("k", "s", "t"), "http://h:9", "r")
    assert for_store(URL, {**opts, "anon": False, "use_listings_cache": False}, env).creds == Credentials("k", "s", "t")
    assert for_store(URL, {}, {**env, "AWS_ENDPOINT_URL": "http://a:1", "AWS_ENDPOINT_URL_S3": "http://b:2/"}).endpoint \
        == "http://b:2"
    # s3fs where this reader would not do what s3fs does
    for options in ({"anon": True}, {"profile": "p"}, {"config_kwargs": {"signature_version": "s3v4"}},
                    {"client_kwargs": {"verify": False}}, {"key": "k"}, {"requester_pays": True}):
        assert for_store(URL, options, env) is None, options
    assert for_store(URL, {}, {**env, "FLOR_S3_READER": "s3fs"}) is None
    assert for_store(f"s3a://{BUCKET}/store", {}, env) is None
    assert for_store(URL, {}, {**files, "AWS_ACCESS_KEY_ID": "ak"}) is None  # partial: botocore's error
    assert for_store(URL, {}, {**env, "AWS_ACCESS_KEY_ID": ""}) is None
    assert for_store(URL, {}, files) is None  # an instance role, or anonymous: botocore's chain


def test_shared_files_as_botocore_reads_them(tmp_path):
    env = _files(tmp_path, "[default]\naws_access_key_id = d\naws_secret_access_key = ds\n"
                           "[dev]\naws_access_key_id = v\naws_secret_access_key = vs\naws_session_token = vt\n",
                 "[default]\nregion = eu-central-1\n[profile dev]\nregion = sa-east-1\n"
                 "[profile cfg]\naws_access_key_id = c\naws_secret_access_key = cs\n"
                 "[profile role]\nrole_arn = arn:aws:iam::1:role/r\nsource_profile = default\n"
                 "[profile proc]\ncredential_process = /bin/creds\n[profile sso]\nsso_session = s\n"
                 "[profile custom]\nendpoint_url = http://x:1\naws_access_key_id = c\naws_secret_access_key = cs\n")
    r = for_store(URL, {}, env)
    assert (r.creds, r.region) == (Credentials("d", "ds"), "eu-central-1")
    r = for_store(URL, {}, {**env, "AWS_PROFILE": "dev"})
    assert (r.creds, r.region) == (Credentials("v", "vs", "vt"), "sa-east-1")
    assert for_store(URL, {}, {**env, "AWS_PROFILE": "cfg"}).creds == Credentials("c", "cs")
    for profile in ("role", "proc", "sso", "custom", "missing"):
        assert for_store(URL, {}, {**env, "AWS_PROFILE": profile}) is None, profile
    assert for_store(URL, {}, {**env, "AWS_WEB_IDENTITY_TOKEN_FILE": "/t", "AWS_ROLE_ARN": "a"}) is None


# --------------------------------------------------------- on a moto server
@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    """A moto server whose requests are counted, holding a recorded store: a segment
    of consolidated runs and a run recorded after it (loose parts)."""
    server = S3()
    server.client().create_bucket(Bucket=BUCKET)
    counting = Counting(server.server._server.app)
    server.server._server.app = counting
    repo = tmp_path_factory.mktemp("lean") / "proj"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    write(repo, "train.py", bench_store.SCRIPT)
    env = server.env(FLOR_STORE=URL)
    subprocess.run([sys.executable, "train.py", "--epochs", "3"], cwd=repo, env=env, check=True, capture_output=True)
    st = server.store(URL)
    (template,) = flor_ray.runs(store=st)["run_id"]
    bench_store.write_runs(st, st.read_json(layout.run_meta(template)), 6, 3, 4)
    consolidate(st, merge_all=True)
    subprocess.run([sys.executable, "train.py", "--epochs", "2"], cwd=repo, env=env, check=True, capture_output=True)
    write(repo, "today.py", bench_store.TODAY)
    yield server, counting, repo, env
    server.stop()


def _cli(repo: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flor_ray.cli", *args], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=120)


COMMANDS = {
    "runs": ["runs", "--format", "json"],
    "df": ["df", "acc", "loss", "--format", "csv"],
    "sql": ["sql", "SELECT run_id, name, count(*) AS n, max(value) AS best FROM logs GROUP BY ALL ORDER BY ALL",
            "--format", "csv"],
    "plan": ["replay", "gnorm", "--script", "today.py", "--dry-run", "--num-gpus", "0"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_commands_answer_as_through_s3fs_in_no_more_requests(moto, command):
    server, counting, repo, env = moto
    got = {}
    for mode in ("s3fs", "lean"):
        counting.take()
        proc = _cli(repo, {**env, "FLOR_S3_READER": mode}, *COMMANDS[command])
        got[mode] = (proc.returncode, proc.stdout, proc.stderr, counting.take())
        assert proc.returncode == 0, proc.stderr
    assert got["lean"][:3] == got["s3fs"][:3]
    lean, s3fs = got["lean"][3], got["s3fs"][3]
    assert sum(lean.values()) <= sum(s3fs.values()) and lean.get("HEAD", 0) <= 1, (lean, s3fs)
    if command != "plan":  # the plan's text names the runs: it holds them all
        assert got["lean"][1].strip()


def test_read_only_commands_import_no_s3fs(moto):
    # nor pandas: sql scans the pieces without pyarrow.dataset (which imports it)
    server, counting, repo, env = moto
    probe = ("import runpy, sys\nsys.argv = ['flor-ray', *sys.argv[1:]]\ntry:\n    runpy.run_module('flor_ray.cli', "
             "run_name='__main__')\nexcept SystemExit:\n    pass\nprint('\\nIMPORTED', sorted({m.split('.')[0] for m in "
             "sys.modules} & {'s3fs', 'fsspec', 'botocore', 'aiobotocore', 'boto3', 'pandas'}))\n")
    for command, args in COMMANDS.items():
        proc = subprocess.run([sys.executable, "-c", probe, *args], cwd=repo, env=env, capture_output=True, text=True,
                              timeout=120)
        assert proc.stdout.rstrip().endswith("IMPORTED []"), (command, proc.stdout[-300:], proc.stderr[-2000:])


def test_listings_reads_and_stamps_equal_s3fs(moto, monkeypatch):
    server, counting, repo, env = moto
    lean = server.store(URL)
    assert lean.reader is not None  # decided once, when first asked
    monkeypatch.setenv("FLOR_S3_READER", "s3fs")
    slow = server.store(URL)
    assert slow.reader is None
    # the stamps are what segment footers keep of the files they hold: they must be s3fs's
    for rel, suffix, recursive in (("logs", ".parquet", True), (layout.SEGMENTS, ".parquet", False),
                                   (layout.RUNS, ".json", False), ("", "", True)):
        assert list_files(lean, rel, suffix, recursive) == list_files(slow, rel, suffix, recursive)
        assert lean.find(rel, suffix) == slow.find(rel, suffix)
    for rel in ("", "logs", layout.RUNS, layout.SEGMENTS, "nothing/here"):
        assert lean.listdir(rel) == slow.listdir(rel) and lean.sizes(rel) == slow.sizes(rel)
    for rel in (layout.MARKER, "logs", "runs/nope.json", "nothing"):
        assert lean.exists(rel) == slow.exists(rel)
    seg = lean.find(layout.SEGMENTS, ".parquet")[0]
    assert lean.read_bytes(seg) == slow.read_bytes(seg) and lean.read_bytes(layout.MARKER) == slow.read_bytes(layout.MARKER)
    # pyarrow over the lean reader: the same rows, and a missing file is missing
    import pyarrow.parquet as pq

    (fa, root), (fb, _) = lean.arrow_fs(), slow.arrow_fs()
    with fa.open_input_file(f"{root}/{seg}") as a, fb.open_input_file(f"{root}/{seg}") as b:
        assert pq.read_table(a).equals(pq.read_table(b))
    with pytest.raises(FileNotFoundError):
        fa.open_input_file(f"{root}/logs/none.parquet")
    assert fa.get_file_info(f"{root}/{seg}").size == len(lean.read_bytes(seg))


def test_missing_key_is_file_not_found(moto):
    server, counting, repo, env = moto
    st = server.store(URL)
    with pytest.raises(FileNotFoundError):
        st.read_bytes("runs/no-such-run.json")
    with pytest.raises(FileNotFoundError):
        st.reader.get(f"{BUCKET}/store/none", 0, 10)
    assert st.reader.head(f"{BUCKET}/store/none") is None and not st.exists("none")
    assert st.listdir("none") == [] and st.sizes("none") == {} and st.find("none") == []
    with pytest.raises(FileNotFoundError, match="NoSuchBucket"):
        Store("s3://no-such-bucket/x", dict(st.storage_options)).read_json("x.json")


def test_listing_pages_past_1000_keys(moto):
    from concurrent.futures import ThreadPoolExecutor

    server, counting, repo, env = moto
    client = server.client()
    keys = [f"many/d{i % 3}/k {i:04d}.txt" for i in range(1203)] + ["many/top.txt"]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: client.put_object(Bucket=BUCKET, Key=k, Body=k.encode()), keys))
    st = server.store(f"s3://{BUCKET}/many")
    counting.take()
    found = st.find("", ".txt")
    assert counting.take() == {"LIST": 2}  # two pages of 1,000
    assert found == sorted(k[len("many/"):] for k in keys)
    assert st.listdir("") == ["d0", "d1", "d2", "top.txt"]
    sizes = st.sizes("d0")
    assert len(sizes) == 401 and sizes["d0/k 0003.txt"] == len(b"many/d0/k 0003.txt")
    assert len(list_files(st, "d1", ".txt", recursive=False)) == 401


def test_a_stopped_server_is_a_store_error(tmp_path):
    server = S3()
    server.client().create_bucket(Bucket=BUCKET)
    st = server.store(URL)
    st.write_json(layout.MARKER, {"format": 1})
    assert st.check() is st
    server.stop()
    fresh = server.store(URL)
    with pytest.raises(StoreError, match=rf"unreachable.*{BUCKET}.*Connection"):
        fresh.check()
    with pytest.raises(StoreError, match="reading runs/x.json in store .*ConnectionRefusedError"):
        fresh.read_bytes("runs/x.json")


# ------------------------------------------------- answers moto cannot give
class _Scripted(http.server.BaseHTTPRequestHandler):
    """Answers each request with the next (status, headers, body) of the server's
    script; records the requests and the connections they came on."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):
        srv = self.server
        srv.seen.append((self.command, self.path, id(self.connection)))
        status, headers, body = srv.script.pop(0) if srv.script else (200, {}, b"ok")
        if status is None:  # hang up without an answer
            self.close_connection = True
            return
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def scripted():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    srv.seen, srv.script = [], []
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _error_xml(code: str, message: str) -> bytes:
    return f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>{message}</Message></Error>".encode()


def test_errors_retries_and_keep_alive(scripted):
    ep = f"http://127.0.0.1:{scripted.server_address[1]}"
    st = Store("s3://b/p", {"key": "k", "secret": "s", "endpoint_url": ep})
    scripted.script = [(200, {}, b"one"), (200, {}, b"two"), (503, {}, _error_xml("SlowDown", "Reduce")),
                       (200, {}, b"three"), (None, {}, b""), (200, {}, b"four")]
    assert [st.read_bytes("a"), st.read_bytes("b"), st.read_bytes("c"), st.read_bytes("d")] == \
        [b"one", b"two", b"three", b"four"]
    paths = [p for _, p, _ in scripted.seen]
    assert paths == ["/b/p/a", "/b/p/b", "/b/p/c", "/b/p/c", "/b/p/d", "/b/p/d"]
    assert len({c for _, _, c in scripted.seen[:3]}) == 1  # one keep-alive connection
    scripted.script = [(403, {}, _error_xml("AccessDenied", "Access Denied by policy"))]
    with pytest.raises(StoreError, match="PermissionError: .*AccessDenied: Access Denied by policy"):
        st.read_bytes("x")
    scripted.script = [(500, {}, _error_xml("InternalError", "boom"))] * 2
    with pytest.raises(StoreError, match="OSError: S3 answered 500 InternalError for b/p/y: boom"):
        st.read_bytes("y")
    scripted.script = [(404, {}, _error_xml("NoSuchKey", "The specified key does not exist."))]
    with pytest.raises(FileNotFoundError):
        st.read_bytes("z")


def test_a_silent_endpoint_times_out_with_the_hint(monkeypatch):
    monkeypatch.setenv("FLOR_READ_TIMEOUT", "0.5")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        ep = f"http://127.0.0.1:{s.getsockname()[1]}"
        st = Store("s3://b/p", {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": ep}})
        t0 = time.monotonic()
        with pytest.raises(StoreError) as err:
            st.read_json("runs/x.json")
        assert time.monotonic() - t0 < 5  # 2 attempts of 0.5 s
    msg = str(err.value)
    assert "ReadTimeoutError" in msg and f"the endpoint {ep} did not answer within read_timeout_s=0.5" in msg, msg


def test_damage_check_reads_ends_through_the_lean_reader(moto):
    server, counting, repo, env = moto
    st = server.store(URL)
    client = server.client()
    client.put_object(Bucket=BUCKET, Key="store/logs/bad/part-0.parquet", Body=b"PAR1" + b"\0" * 40 + b"XXXX")
    try:
        damage._PART_CACHE.clear()
        counting.take()
        why = damage.part_problem(st, "logs/bad/part-0.parquet", None)
        assert "no PAR1 magic" in why and counting.take() == {"HEAD": 1, "GET": 2}
    finally:
        client.delete_object(Bucket=BUCKET, Key="store/logs/bad/part-0.parquet")
        CACHE.reset()
        damage._PART_CACHE.clear()


def test_arrow_file_infos_of_many_paths_in_one_listing(moto, monkeypatch):
    import pyarrow.fs as pafs

    server, counting, repo, env = moto
    lean = server.store(URL)
    assert lean.reader is not None
    monkeypatch.setenv("FLOR_S3_READER", "s3fs")
    slow = server.store(URL)
    files = [lean.path(p) for p in lean.find("", "")]
    assert len(files) >= 3
    asked = files + [lean.path("logs/none.parquet"), lean.path("logs")]
    (fa, _), (fb, _) = lean.arrow_fs(), slow.arrow_fs()
    counting.take()
    got = fa.get_file_info(asked)
    requests = counting.take()
    want = fb.get_file_info(asked)
    assert [(i.path, i.type, i.size if i.type == pafs.FileType.File else None) for i in got] == \
        [(i.path, i.type, i.size if i.type == pafs.FileType.File else None) for i in want]
    # one listing for the files, a HEAD (and a listing) for each path it does not hold
    assert requests.get("LIST", 0) <= 3 and requests.get("HEAD", 0) == 2, requests


def test_a_segment_is_opened_with_the_get_that_read_its_origins(moto):
    import pyarrow.parquet as pq

    from flor_ray.store import segments

    server, counting, repo, env = moto
    st = server.store(URL)
    (seg,) = segments.stable_segments(st)
    counting.take()
    origins = segments._read_origins(st, seg)
    fs, root = st.arrow_fs()
    with fs.open_input_file(f"{root}/{seg.path}") as fh:
        table = pq.ParquetFile(fh).read()
    assert counting.take() == {"GET": 1}  # the file's end (all of it here), once
    assert table.num_rows == sum(o.rows for o in origins) > 0


OBJECT_STORE_QUERIES = [
    "SELECT count(*) AS n FROM logs",
    "SELECT * FROM logs ORDER BY ALL",
    "SELECT run_id, name, count(*) AS n, max(value) AS best FROM logs WHERE name = 'acc' GROUP BY ALL ORDER BY ALL",
    "SELECT l.source, r.status, count(*) AS n FROM logs_all l JOIN runs r USING (run_id) GROUP BY ALL ORDER BY ALL",
    "SELECT count(*) AS n, count(DISTINCT run_id) AS runs FROM logs WHERE iter1 IS NOT NULL",
    # filters on the source and the run: applied to the pieces
    "SELECT source, count(*) AS n FROM logs_all WHERE source IN ('record', 'replay') GROUP BY ALL ORDER BY ALL",
    "SELECT count(*) AS n FROM logs_all WHERE source = 'replay'",
    "SELECT name, count(*) AS n FROM logs WHERE run_id = (SELECT min(run_id) FROM runs) GROUP BY ALL ORDER BY ALL",
    "SELECT name, sum(value) AS s FROM logs WHERE run_id IN (SELECT run_id FROM runs ORDER BY run_id LIMIT 2) "
    "AND source = 'record' GROUP BY ALL ORDER BY ALL",
]


#: how ``sql`` reads an object store's relation: the mode's settings, and the kind of table it makes
SQL_MODES = {
    "dataset": ({"available": False}, None),
    "pieces in memory": ({"FETCH_BYTES": 0}, "table"),
    "pieces read by each query": ({"FETCH_BYTES": 0, "SQL_MATERIALIZE_ROWS": 0}, "view"),
    "copies in memory": ({}, "table"),
    "copies read by each query": ({"SQL_MATERIALIZE_ROWS": 0}, "view"),
}


@pytest.mark.parametrize("query", OBJECT_STORE_QUERIES)
def test_sql_on_an_object_store_answers_alike_in_every_mode(moto, query, monkeypatch):
    """The pieces of an object store scanned through pyarrow's Parquet reader (held in
    memory or read by each query) and the files fetched whole and read by DuckDB's own
    reader answer as the pyarrow dataset does."""
    import pandas as pd

    from flor_ray.queries import copies, sources
    from flor_ray.queries import sql as query_sql

    server, _, _, env = moto
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        if k in env:
            monkeypatch.setenv(k, env[k])
    st = server.store(URL)
    answers = {}
    for mode, (settings, want_kind) in SQL_MODES.items():
        query_sql.connection(st).close()
        with monkeypatch.context() as m:
            for name, value in settings.items():
                if name == "available":
                    m.setattr(sources, "available", lambda con, v=value: v)
                else:
                    m.setattr(copies if name == "FETCH_BYTES" else query_sql, name, value)
            answers[mode] = flor_ray.sql(query, store=st)
            conn = query_sql.connection(st)
            kind, held = conn.logs_kind, dict(conn.copies.held())
        assert want_kind is None or kind == want_kind, mode
        if mode == "copies read by each query":  # every file of the relation, held locally
            files = {p.file for p in query_sql.log_parts(st)}
            assert set(held) == files and all(Path(v).is_file() for v in held.values())
        else:
            assert held == {}, mode  # not fetched, or released once the rows were in memory
    query_sql.connection(st).close()
    assert len(answers["dataset"]) > 0
    for mode in SQL_MODES:
        pd.testing.assert_frame_equal(answers[mode], answers["dataset"])


def test_sql_copies_follow_the_listing_and_go_with_the_connection(moto, tmp_path, monkeypatch):
    """The files fetched for the reader are fetched once while the listing names them
    unchanged; a new run fetches only its own file; files compacted away lose their
    copies; closing the connection removes the folder."""
    import dataclasses

    from flor_ray.queries import copies
    from flor_ray.queries import sql as query_sql

    server, _, _, env = moto
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        if k in env:
            monkeypatch.setenv(k, env[k])
    monkeypatch.setattr(query_sql, "SQL_MATERIALIZE_ROWS", 0)  # the copies stay: a view over them
    url = f"s3://{BUCKET}/copies"
    repo = tmp_path / "proj"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    write(repo, "train.py", bench_store.SCRIPT)
    run_env = server.env(FLOR_STORE=url)

    def record():
        subprocess.run([sys.executable, "train.py", "--epochs", "2"], cwd=repo, env=run_env, check=True,
                       capture_output=True, timeout=120)

    st = server.store(url)
    fetched: list[str] = []
    read = st.read_bytes
    monkeypatch.setattr(st, "read_bytes", lambda rel: (fetched.append(rel) if rel.endswith(".parquet") else None)
                        or read(rel))
    query = "SELECT run_id, count(*) AS n FROM logs GROUP BY ALL ORDER BY ALL"
    record()
    first = flor_ray.sql(query, store=st)
    conn = query_sql.connection(st)
    held = dict(conn.copies.held())
    assert len(first) == 1 and len(held) == 1 and fetched == list(held)
    folder = Path(conn.copies.folder)
    assert all(Path(p).parent == folder for p in held.values())

    fetched.clear()
    assert flor_ray.sql(query, store=st).equals(first) and fetched == []  # the same listing: nothing fetched

    record()
    second = flor_ray.sql(query, store=st)
    now = dict(conn.copies.held())
    assert len(second) == 2 and len(fetched) == 1 and set(now) == set(held) | set(fetched)
    assert all(now[rel] == held[rel] for rel in held)  # the first run's copy kept

    CACHE.reset()  # compaction below lists the store afresh
    consolidate(st, merge_all=True)
    fetched.clear()
    third = flor_ray.sql(query, store=st)
    conn = query_sql.connection(st)
    segs = dict(conn.copies.held())
    assert third.equals(second) and len(segs) == 1 and layout.is_segment(next(iter(segs)))
    assert fetched == list(segs) and sorted(p.name for p in Path(conn.copies.folder).iterdir()) == \
        [Path(segs[next(iter(segs))]).name]  # the loose files' copies removed

    # a file whose size is not the listed one changed since: an error, nothing kept
    piece = next(p for p in query_sql.log_parts(st))
    fresh = copies.LocalCopies()
    with pytest.raises(OSError, match="changed since it was listed"):
        fresh.paths(st, [dataclasses.replace(piece, file_size=piece.file_size + 1)])
    assert fresh.held() == {}
    fresh.clear()

    folder = Path(conn.copies.folder)
    conn.close()
    assert not folder.exists() and conn.copies.held() == {}


def test_sql_on_an_object_store_leaves_no_copies_at_exit(moto, tmp_path):
    """The command line, and a process that exits with the copies still read by a view."""
    server, counting, repo, env = moto
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    run_env = {**env, "TMPDIR": str(tmp)}
    proc = _cli(repo, run_env, "sql", "SELECT name, count(*) AS n FROM logs GROUP BY ALL ORDER BY ALL",
                "--format", "csv")
    assert proc.returncode == 0, proc.stderr
    assert "acc," in proc.stdout and "loss," in proc.stdout
    assert list(tmp.iterdir()) == []
    script = (
        "import os, flor_ray\n"
        "from flor_ray.api import resolve_store\nfrom flor_ray.queries import sql\n"
        "sql.SQL_MATERIALIZE_ROWS = 0\n"
        "print(len(flor_ray.sql('SELECT * FROM logs')), len(os.listdir(sql.connection(resolve_store()).copies.folder)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=repo, env=run_env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows, held = map(int, proc.stdout.split())
    assert rows > 0 and held >= 2  # the segment and the loose run's file were read as copies
    assert list(tmp.iterdir()) == []


def test_sql_without_room_for_copies_reads_the_store_through_pyarrow(moto, tmp_path, monkeypatch):
    import tempfile

    import pandas as pd

    from flor_ray.queries import sources
    from flor_ray.queries import sql as query_sql

    server, _, _, env = moto
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        if k in env:
            monkeypatch.setenv(k, env[k])
    st = server.store(URL)
    query = "SELECT run_id, name, count(*) AS n, sum(value) AS s FROM logs GROUP BY ALL ORDER BY ALL"
    query_sql.connection(st).close()
    with monkeypatch.context() as m:
        m.setattr(sources, "available", lambda con: False)
        want = flor_ray.sql(query, store=st)
    query_sql.connection(st).close()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "not-there"))
    got = flor_ray.sql(query, store=st)
    conn = query_sql.connection(st)
    assert conn.copies.held() == {} and conn.copies.folder is None and not (tmp_path / "not-there").exists()
    conn.close()
    pd.testing.assert_frame_equal(got, want)
