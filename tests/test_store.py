"""One store suite, run against every backend (local files, memory://, S3 on 127.0.0.1)."""

from __future__ import annotations

import socket
import uuid

import pytest

from flor_ray.errors import InvalidNameError, StoreError, StoreNotFoundError
from flor_ray.relation import dataframe, read_logs, rows_to_table, sql, table_to_parquet_bytes
from flor_ray.store import Store, safe_component


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    import boto3

    boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1"
    ).create_bucket(Bucket="flor-test")
    yield endpoint
    server.stop()


@pytest.fixture(params=["local", "memory", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return Store(str(tmp_path / "store"))
    if request.param == "memory":
        return Store(f"memory://flor-{uuid.uuid4().hex}")
    endpoint = request.getfixturevalue("s3_server")
    opts = {"key": "test", "secret": "test", "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    st = Store(f"s3://flor-test/{uuid.uuid4().hex}", opts)
    return st


class TestStoreSuite:
    def test_check_before_and_after_ensure(self, store):
        with pytest.raises(StoreNotFoundError, match="no flor_ray store"):
            store.check()
        store.ensure()
        store.ensure()  # idempotent
        assert store.check() is store

    def test_write_read_roundtrip_and_listing(self, store):
        store.ensure()
        store.write_bytes("a/b/one.bin", b"1" * 1000)
        store.write_bytes("a/b/one.bin", b"2")  # overwrite is atomic and whole
        store.write_json("a/two.json", {"x": [1, 2]})
        assert store.read_bytes("a/b/one.bin") == b"2"
        assert store.read_json("a/two.json") == {"x": [1, 2]}
        assert store.listdir("a") == ["b", "two.json"]
        assert store.find("a", ".bin") == ["a/b/one.bin"]
        assert store.exists("a/two.json") and not store.exists("a/three.json")
        with pytest.raises(FileNotFoundError):
            store.read_bytes("a/missing")

    def test_paths_cannot_escape(self, store):
        with pytest.raises(StoreError, match="escapes"):
            store.path("../outside")
        with pytest.raises(InvalidNameError):
            store.runs_rel("../../etc/passwd")
        with pytest.raises(InvalidNameError):
            safe_component("run id", "a/b")

    def test_relation_roundtrip(self, store):
        store.ensure()
        prefixes = [("epoch", (), None, 1), ("epoch/step", (0,), None, 2)]
        table = rows_to_table(
            version="v1", file="train.py", prefixes=prefixes, pids=[0, 1, 1, 0], lasts=[0, 1, 1, 1],
            items=[(3, "a")], names=["acc", "loss", "tag", "acc"], values=[0.5, 2, "hi", 0.75], seq_start=0,
        )
        assert table.column("iter0").to_pylist() == [0, 0, 0, 1]
        assert table.column("iter1").to_pylist() == [None, 1, 1, None]
        assert table.column("items").to_pylist() == [None, None, None, '["a"]']
        store.write_bytes("logs/run_id=r1/source=record/part-00000.parquet", table_to_parquet_bytes(table))
        store.write_json("runs/r1.json", {"run_id": "r1", "version": "v1", "args": {"lr": 0.1}, "status": "finished", "started_at": "2026-01-01T00:00:00+00:00"})
        t = read_logs(store, ["acc"])
        assert t.num_rows == 2 and set(t.column("run_id").to_pylist()) == {"r1"}
        df = dataframe(store, ["acc", "loss"])
        assert list(df.columns) == ["run_id", "version", "lr", "epoch", "step", "acc", "loss"]
        assert df["acc"].tolist()[0] == 0.5 and df["loss"].dropna().tolist() == [2]
        res = sql(store, "SELECT count(*) AS n FROM logs JOIN runs USING (run_id) WHERE lr = 0.1")
        assert res["n"].tolist() == [4]
