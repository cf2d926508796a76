"""Settings: defaults < config file < environment < arguments; configs/ files stay true."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT, clean_env
from flor_ray.api import resolve_store
from flor_ray.config import DEFAULTS_DOC, ENV_VARS, Settings, load_settings
from flor_ray.errors import ConfigError, FlorError

CONFIGS = REPO_ROOT / "configs"


@pytest.fixture(autouse=True)
def no_flor_env(monkeypatch):
    """Each test starts from a clean FLOR_* environment."""
    for var in [*ENV_VARS.values(), "FLOR_CONFIG"]:
        monkeypatch.delenv(var, raising=False)


def write_yaml(tmp_path: Path, text: str, name: str = "flor.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_without_file_or_env():
    s = load_settings()
    assert s == Settings()
    assert (s.store, s.checkpoint_budget, s.checkpoint_max_period, s.fidelity_rtol, s.max_retries) == (None, 0.01, 16, 0.0, 3)
    assert s.snapshot_max_file_bytes == 10 * 1024 * 1024 and dict(s.storage_options) == {}


def test_precedence_file_then_env_then_arguments(tmp_path, monkeypatch):
    cfg = write_yaml(tmp_path, "store: /from/file\ncheckpoint_budget: 0.05\nmax_retries: 5\n"
                               "storage_options: {endpoint_url: 'http://127.0.0.1:9000'}\n")
    s = load_settings(cfg)
    assert (s.store, s.checkpoint_budget, s.max_retries) == ("/from/file", 0.05, 5)
    assert s.storage_options == {"endpoint_url": "http://127.0.0.1:9000"}
    assert s.checkpoint_max_period == 16  # untouched by the file: the default

    monkeypatch.setenv("FLOR_CHECKPOINT_BUDGET", "0.02")
    monkeypatch.setenv("FLOR_STORE", "/from/env")
    s = load_settings(cfg)
    assert (s.store, s.checkpoint_budget, s.max_retries) == ("/from/env", 0.02, 5)

    s = load_settings(cfg, store="/from/arg", checkpoint_budget=0.5, max_retries=None)
    assert (s.store, s.checkpoint_budget, s.max_retries) == ("/from/arg", 0.5, 5)  # None = not given


def test_flor_config_env_names_the_file(tmp_path, monkeypatch):
    cfg = write_yaml(tmp_path, "checkpoint_max_period: 4\n")
    monkeypatch.setenv("FLOR_CONFIG", str(cfg))
    assert load_settings().checkpoint_max_period == 4
    other = write_yaml(tmp_path, "checkpoint_max_period: 8\n", "other.yaml")
    assert load_settings(other).checkpoint_max_period == 8  # the argument wins over FLOR_CONFIG


def test_every_env_var_is_read(monkeypatch):
    values = {"store": "s3://b/p", "checkpoint_budget": "0.03", "checkpoint_max_period": "7",
              "snapshot_max_file_bytes": "1024", "fidelity_rtol": "1e-6", "max_retries": "0",
              "snapshot_max_untracked_files": "12", "snapshot_max_untracked_total_bytes": "4096",
              "spool_dir": "/spool", "write_retries": "2", "connect_timeout_s": "3", "read_timeout_s": "4",
              "ray_connect_timeout_s": "5", "flush_interval_s": "0.5", "output_max_bytes": "2048",
              "compact_after": "0", "consolidate_after": "5"}
    assert set(values) == set(ENV_VARS)
    for name, raw in values.items():
        monkeypatch.setenv(ENV_VARS[name], raw)
    s = load_settings()
    assert (s.store, s.checkpoint_budget, s.checkpoint_max_period, s.snapshot_max_file_bytes, s.fidelity_rtol,
            s.max_retries, s.snapshot_max_untracked_files, s.snapshot_max_untracked_total_bytes) == (
        "s3://b/p", 0.03, 7, 1024, 1e-6, 0, 12, 4096)
    assert s.output_max_bytes == 2048
    assert (s.spool_dir, s.write_retries, s.connect_timeout_s, s.read_timeout_s, s.ray_connect_timeout_s) == (
        "/spool", 2, 3.0, 4.0, 5.0)
    assert s.flush_interval_s == 0.5
    assert s.compact_after == 0 and isinstance(s.compact_after, int)
    assert s.consolidate_after == 5 and isinstance(s.consolidate_after, int)
    assert isinstance(s.checkpoint_max_period, int) and isinstance(s.checkpoint_budget, float)


@pytest.mark.parametrize(
    "text, message",
    [
        ("checkpoint_budgett: 0.1\n", "unknown setting 'checkpoint_budgett'"),
        ("checkpoint_budget: lots\n", "checkpoint_budget='lots'"),
        ("checkpoint_budget: 0\n", "out of range"),
        ("checkpoint_budget: 2\n", "(0, 1]"),
        ("checkpoint_max_period: 1.5\n", "is not an int"),
        ("checkpoint_max_period: 0\n", "out of range"),
        ("max_retries: -1\n", "out of range"),
        ("max_retries: yes\n", "is not an int"),
        ("storage_options: [1, 2]\n", "storage_options"),
        ("store: 12\n", "URL or path string"),
        ("- a list\n- of things\n", "must hold a mapping"),
        ("key: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_file_is_a_config_error_naming_the_file(tmp_path, text, message):
    cfg = write_yaml(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    assert message in str(info.value)
    assert isinstance(info.value, (FlorError, ValueError))
    if "unknown" in message or "=" in message:
        assert str(cfg) in str(info.value)  # says which file


def test_missing_file(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml")
    monkeypatch.setenv("FLOR_CONFIG", str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="FLOR_CONFIG"):
        load_settings()


def test_empty_file_is_all_defaults(tmp_path):
    assert load_settings(write_yaml(tmp_path, "# nothing set\n")) == Settings()


def test_bad_env_and_bad_argument_name_their_source(monkeypatch):
    monkeypatch.setenv("FLOR_MAX_RETRIES", "three")
    with pytest.raises(ConfigError, match="environment FLOR_MAX_RETRIES"):
        load_settings()
    monkeypatch.delenv("FLOR_MAX_RETRIES")
    with pytest.raises(ConfigError, match="argument"):
        load_settings(fidelity_rtol=-1)
    with pytest.raises(ConfigError, match="unknown setting 'budget'"):
        load_settings(budget=0.1)


def test_resolve_store_honors_the_config_file(tmp_path, monkeypatch):
    cfg = write_yaml(tmp_path, f"store: {tmp_path / 'store-from-file'}\n")
    assert resolve_store(config=cfg).root.endswith("store-from-file")
    monkeypatch.setenv("FLOR_CONFIG", str(cfg))
    assert resolve_store().root.endswith("store-from-file")
    monkeypatch.setenv("FLOR_STORE", str(tmp_path / "store-from-env"))
    assert resolve_store().root.endswith("store-from-env")
    assert resolve_store(str(tmp_path / "store-from-arg")).root.endswith("store-from-arg")


def test_cli_config_option_feeds_the_store(tmp_path):
    """`flor-ray --config FILE` (before or after the command) reaches the store lookup."""
    cfg = write_yaml(tmp_path, f"store: {tmp_path / 'nostore'}\n")
    for args in (["--config", str(cfg), "runs"], ["runs", "--config", str(cfg)]):
        proc = subprocess.run([sys.executable, "-m", "flor_ray.cli", *args], cwd=tmp_path, env=clean_env(),
                              capture_output=True, text=True)
        assert proc.returncode == 2
        assert "no flor_ray store at" in proc.stderr and "nostore" in proc.stderr
    bad = write_yaml(tmp_path, "checkpoint_budget: lots\n", "bad.yaml")
    proc = subprocess.run([sys.executable, "-m", "flor_ray.cli", "--config", str(bad), "runs"], cwd=tmp_path,
                          env=clean_env(), capture_output=True, text=True)
    assert proc.returncode == 2 and "checkpoint_budget='lots'" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------ configs/ files
def test_local_yaml_lists_every_default_with_a_reason():
    text = (CONFIGS / "local.yaml").read_text()
    data = yaml.safe_load(text)
    names = [f.name for f in dataclasses.fields(Settings)]
    assert sorted(data) == sorted(names)
    assert load_settings(CONFIGS / "local.yaml") == Settings()  # every value is the default
    for name, default in DEFAULTS_DOC.items():
        assert data[name] == default, name
    # each setting is preceded by a comment block that gives its reason
    lines = text.splitlines()
    for name in names:
        i = next(n for n, ln in enumerate(lines) if ln.startswith(f"{name}:"))
        comment = []
        for ln in reversed(lines[:i]):
            if not ln.startswith("#"):
                break
            comment.append(ln)
        assert len(" ".join(comment)) > 60, f"{name} has no reason in configs/local.yaml"
        if name in ENV_VARS:
            assert ENV_VARS[name] in " ".join(comment), f"{name}: its environment variable is not named"


def test_local_yaml_reasons_match_config_py():
    """The reasons in local.yaml are the ones of config.py (checked on a key phrase each)."""
    src = (REPO_ROOT / "flor_ray" / "config.py").read_text()
    text = (CONFIGS / "local.yaml").read_text()
    for phrase in ["record-overhead target is 2%", "never re-executes more than", "tracked files are always",
                   "bit-for-bit", "worker crash, node loss"]:
        norm = lambda s: " ".join(s.replace("#:", " ").replace("#", " ").split()).lower()  # noqa: E731
        assert norm(phrase) in norm(src) and norm(phrase) in norm(text), phrase


def test_cluster_yaml_is_a_valid_ray_cluster_config():
    import jsonschema
    from importlib.resources import files

    cfg = yaml.safe_load((CONFIGS / "cluster.yaml").read_text())
    schema = json.loads(files("ray.autoscaler").joinpath("ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types and len([t for t in types if t != cfg["head_node_type"]]) >= 1
    setup = " ".join(cfg["setup_commands"])
    pin = re.search(r"torch==[\w.+]+", (REPO_ROOT / "constraints.txt").read_text()).group(0)
    assert "pip install" in setup and "flor_ray" in setup and pin in setup  # same torch as constraints.txt
    for cmds in (cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"], cfg["setup_commands"]):
        assert "FLOR_STORE=s3://bucket/flor" in " ".join(cmds)
    assert "#" in (CONFIGS / "cluster.yaml").read_text().split("setup_commands:")[0]  # commented
