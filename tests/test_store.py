"""One store suite, run against every backend (local files, memory://, S3 on 127.0.0.1)."""

from __future__ import annotations

import os
import pickle
import uuid

import pytest

from flor_ray.errors import InvalidNameError, StoreError, StoreNotFoundError
from flor_ray.queries.dataframe import dataframe
from flor_ray.queries.sql import sql
from flor_ray.record.rows import rows_to_table
from flor_ray.store.logs import read_logs, table_to_parquet_bytes
from flor_ray.store import Store, layout, safe_component, write_local


@pytest.fixture(scope="module")
def s3_server():
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    from conftest import S3

    server = S3()
    server.client().create_bucket(Bucket="flor-test")
    yield server.endpoint
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
            version="v1", file="train.py", prefixes=prefixes, prefix_ids=[0, 1, 1, 0], lasts=[0, 1, 1, 1],
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

    # ---------------------------------------------------------- every other operation
    def test_url_repr_root_and_paths(self, store):
        assert repr(store) == f"Store({store.url!r})"
        assert not store.url.endswith("/") and Store(store.url + "/", store.storage_options).url == store.url
        assert store.path("a", "b.json") == f"{store.root}/a/b.json"
        assert store.full_url("a/b.json") == f"{store.url}/a/b.json"
        assert store.is_local == (not store.url.startswith(("memory://", "s3://")))
        with pytest.raises(StoreError, match="escapes"):
            store.path("/abs")

    def test_endpoint_names_where_requests_go(self, store):
        if store.url.startswith("s3://"):
            assert store.endpoint() == store.storage_options["client_kwargs"]["endpoint_url"]
        else:
            assert store.endpoint() == store.url

    def test_pickled_store_reads_what_the_original_wrote(self, store):
        store.ensure()
        store.write_json("a/x.json", {"k": 1})
        copy = pickle.loads(pickle.dumps(store))
        assert copy.url == store.url and dict(copy.storage_options) == dict(store.storage_options)
        assert copy.read_json("a/x.json") == {"k": 1} and copy.check() is copy

    def test_durable_write_overwrite_and_delete(self, store):
        store.ensure()
        store.write_bytes("d/one.pt", b"x" * 10, durable=True)
        store.write_bytes("d/one.pt", b"y", durable=True)
        store.write_bytes("d/sub/two.pt", b"z")
        assert store.read_bytes("d/one.pt") == b"y"
        store.delete("d/one.pt")
        assert not store.exists("d/one.pt") and store.exists("d/sub/two.pt")
        store.delete("d")  # a folder, recursively
        assert not store.exists("d/sub/two.pt") and store.find("d") == []
        store.delete("d/never-there")  # deleting what is gone is not an error

    def test_read_json_of_a_damaged_file_says_so(self, store):
        store.ensure()
        store.write_bytes("bad.json", b'{"run_id": "r1", "trunc')
        with pytest.raises(StoreError, match="bad.json is not valid JSON"):
            store.read_json("bad.json")
        with pytest.raises(FileNotFoundError):
            store.read_json("missing.json")

    def test_listings_leave_out_temporaries_and_folders(self, store):
        store.ensure()
        store.write_bytes("a/b/one.bin", b"1" * 7)
        store.write_bytes("a/b/two.txt", b"22")
        store.write_bytes("a/b/.tmp-123", b"partial")
        store.write_bytes("a/b/_SUCCESS", b"")
        store.write_bytes("a/b/c/three.bin", b"333")
        assert store.listdir("a/b") == ["c", "one.bin", "two.txt"]
        assert store.sizes("a/b") == {"a/b/one.bin": 7, "a/b/two.txt": 2}
        assert store.find("a", ".bin") == ["a/b/c/three.bin", "a/b/one.bin"]
        assert store.find("a") == ["a/b/c/three.bin", "a/b/one.bin", "a/b/two.txt"]
        assert store.listdir("nowhere") == [] and store.sizes("nowhere") == {} and store.find("nowhere") == []

    def test_ensure_writes_marker_and_gitignore_for_local_stores(self, store):
        assert not store.exists(layout.MARKER)
        store.ensure()
        assert store.read_json(layout.MARKER)["tool"] == "flor_ray"
        assert store.exists(".gitignore") == store.is_local  # a local store inside a repository ignores itself

    def test_runs_rel_and_run_ids(self, store):
        store.ensure()
        for rid in ("r2", "r1"):
            store.write_json(store.runs_rel(rid), {"run_id": rid})
        store.write_bytes("runs/notes.txt", b"not a run")
        store.write_bytes("runs/.tmp-r3", b"{}")
        assert store.runs_rel("r1") == "runs/r1.json" == layout.run_meta("r1")
        assert sorted(store.iter_run_ids()) == ["r1", "r2"]

    def test_arrow_fs_reads_the_stores_files(self, store):
        store.ensure()
        store.write_bytes("a/blob.bin", b"arrow sees this")
        fs, root = store.arrow_fs()
        with fs.open_input_file(f"{root}/a/blob.bin") as f:
            assert f.read() == b"arrow sees this"

    def test_layout_paths_parse_back(self, store):
        """The paths the writers use are the ones the readers take apart."""
        store.ensure()
        rec, rep = layout.record_part("r1", 3), layout.replay_part("r1", "task-k")
        store.write_bytes(rec, b"r")
        store.write_bytes(rep, b"p")
        found = store.find(layout.LOGS, ".parquet")
        assert found == sorted([rec, rep])
        assert [layout.part_run_id(f) for f in found] == ["r1", "r1"]
        assert sorted(layout.part_source(f) for f in found) == ["record", "replay"]
        assert layout.part_task(rep) == "task-k" and layout.part_run_folder(rep) == "logs/run_id=r1"
        assert store.find(layout.log_folder("r1", "replay"), ".parquet") == [rep]
        assert store.find(layout.checkpoint_folder("r1")) == []
        store.write_bytes(layout.checkpoint("r1", 4), b"ck")
        assert store.find(layout.checkpoint_folder("r1")) == ["checkpoints/r1/000004.pt"]


def test_store_url_must_be_a_url_or_a_folder(tmp_path, monkeypatch):
    with pytest.raises(StoreError, match="non-empty string"):
        Store("  ")
    with pytest.raises(StoreError, match="needs '://'"):
        Store("s3:/bucket/flor")
    monkeypatch.chdir(tmp_path)
    assert Store("rel/store").url == str(tmp_path / "rel" / "store")


def test_write_local_leaves_no_temporary_on_failure(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(OSError):
        write_local(str(tmp_path / "file" / "x.bin"), b"data")  # its folder is a file
    target = tmp_path / "d" / "x.bin"
    write_local(str(target), b"data", durable=True)
    assert target.read_bytes() == b"data" and os.listdir(tmp_path / "d") == ["x.bin"]
