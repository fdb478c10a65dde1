"""mlflowctl.yaml validation, overrides and secrets."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import example_stages
from mlflowctl.config import Setting, public, full_schema
from mlflowctl.config import load_config as core_load_config
from mlflowctl.errors import EXIT_CONFIG, ConfigError
from mlflowctl.plugin_manager import build_plugin_manager

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def registry():
    return build_plugin_manager(load_entry_points=False).registry


def load_config(path, overrides=None, registry=None):
    """The example project's schema: the core's, the plugins' and its stages' settings (tasks/)."""
    return core_load_config(path, overrides, registry=registry, stages=example_stages())


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mlflowctl.yaml"
    path.write_text(text)
    return path


def test_repo_config_is_valid_and_complete(registry):
    cfg = load_config(REPO / "mlflowctl.yaml", registry=registry)
    assert cfg["train_model"]["learning_rate"] == 0.001
    assert cfg["backend"] == "local"
    # every plugin section is filled with its defaults
    assert set(cfg["backends"]) == set(registry.backends)


def test_defaults_fill_an_empty_file(tmp_path, registry):
    cfg = load_config(write(tmp_path, ""), registry=registry)
    assert cfg["data"]["dataset"] == "fashion-mnist"
    assert cfg["train_concept"]["threshold_quantile"] == 0.99


@pytest.mark.parametrize("text, message", [
    ("train_model:\n  learning_rat: 0.1\n", "mlflowctl.yaml: train_model.learning_rat: unknown key; did you mean 'learning_rate'?"),
    ("train_model:\n  epochs: many\n", "mlflowctl.yaml: train_model.epochs: expected an integer, got 'many'"),
    ("train_model:\n  epochs: 2.5\n", "mlflowctl.yaml: train_model.epochs: expected an integer, got 2.5"),
    ("train_model: 3\n", "mlflowctl.yaml: train_model: expected a mapping, got 3"),
    ("data:\n  dataset: cifar\n", "mlflowctl.yaml: data.dataset: expected one of fashion-mnist, mnist, got 'cifar'"),
    ("bogus: 1\n", "mlflowctl.yaml: bogus: unknown key"),
    ("backends:\n  dokcer: {}\n", "mlflowctl.yaml: backends.dokcer: unknown key"),
    ("train_model: [1, 2\n", "mlflowctl.yaml: line"),
])
def test_errors_name_file_key_and_expectation(tmp_path, registry, text, message):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), registry=registry)
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)
    assert info.value.exit_code == EXIT_CONFIG


def test_int_is_accepted_for_float(tmp_path, registry):
    cfg = load_config(write(tmp_path, "train_model:\n  learning_rate: 1\n"), registry=registry)
    assert cfg["train_model"]["learning_rate"] == 1.0 and isinstance(cfg["train_model"]["learning_rate"], float)


def test_overrides_are_coerced_to_the_declared_type(tmp_path, registry):
    overrides = {"train_model.learning_rate": "0.002", "train_model.epochs": "3", "backend": "local",
                 "data.sources": "file:///a/,file:///b/"}
    cfg = load_config(write(tmp_path, ""), overrides, registry=registry)
    assert cfg["train_model"]["learning_rate"] == 0.002
    assert cfg["train_model"]["epochs"] == 3
    assert cfg["data"]["sources"] == ["file:///a/", "file:///b/"]
    cfg = load_config(write(tmp_path, ""), {"data.sources": '["x", "y"]'}, registry=registry)
    assert cfg["data"]["sources"] == ["x", "y"]


@pytest.mark.parametrize("override, message", [
    ({"train_modle.epochs": "1"}, "override train_modle.epochs=1: train_modle: unknown key; did you mean 'train_model'?"),
    ({"train_model.epochs": "x"}, "mlflowctl.yaml: train_model.epochs: expected an integer, got 'x'"),
    ({"train_model": "1"}, "override train_model=1: train_model is a section, not a value"),
    ({"backend": "nope"}, None),  # a string is a string; the unknown backend is reported when used
])
def test_bad_overrides(tmp_path, registry, override, message):
    if message is None:
        assert load_config(write(tmp_path, ""), override, registry=registry)["backend"] == "nope"
        return
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, ""), override, registry=registry)
    assert str(info.value).startswith(message), str(info.value)


def test_unknown_backend_lists_known_ones(registry):
    with pytest.raises(ConfigError) as info:
        registry.backend("lcoal")
    assert "did you mean 'local'" in str(info.value) and "known:" in str(info.value)


def test_secrets_resolve_from_env_and_file_and_stay_out_of_public_views(tmp_path, monkeypatch):
    spec = {"token": Setting(str, "", "api token", secret=True), "region": Setting(str, "eu")}

    class Fake:
        name = "fake"
        settings = spec

    class Reg:
        backends = {"fake": Fake}
        stores: dict = {}
        serving_targets: dict = {}

    monkeypatch.setenv("MY_TOKEN", "s3cr3t")
    cfg = load_config(write(tmp_path, 'backend: fake\nbackends:\n  fake:\n    token: {"$env": MY_TOKEN}\n'), registry=Reg)
    assert cfg["backends"]["fake"]["token"] == "s3cr3t"
    shown = public(cfg.data, full_schema(Reg))
    assert "token" not in shown["backends"]["fake"] and shown["backends"]["fake"]["region"] == "eu"

    secret_file = tmp_path / "tok"
    secret_file.write_text("from-file\n")
    cfg = load_config(write(tmp_path, f'backend: fake\nbackends:\n  fake:\n    token: {{"$file": "{secret_file}"}}\n'), registry=Reg)
    assert cfg["backends"]["fake"]["token"] == "from-file"

    monkeypatch.delenv("MY_TOKEN")
    with pytest.raises(ConfigError, match="environment variable MY_TOKEN is not set"):
        load_config(write(tmp_path, 'backend: fake\nbackends:\n  fake:\n    token: {"$env": MY_TOKEN}\n'), registry=Reg)


def test_parsed_config_is_cached_until_the_file_changes(tmp_path):
    from mlflowctl.project import Project

    path = write(tmp_path, "train_model:\n  epochs: 3\n")
    assert Project(tmp_path, {}, stages=example_stages()).config["train_model"]["epochs"] == 3
    cache = tmp_path / ".mlflowctl" / "config.cache.json"
    assert cache.is_file()
    path.write_text("train_model:\n  epochs: 4\n")  # same size, same inode, maybe the same mtime tick
    assert Project(tmp_path, {}, stages=example_stages()).config["train_model"]["epochs"] == 4
    path.write_text("train_model:\n  epochs: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        Project(tmp_path, {}, stages=example_stages())
