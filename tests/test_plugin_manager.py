"""The plugin manager: built-ins and entry points through one path, validation, provenance."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

import mlflowctl
from mlflowctl import hookspecs
from mlflowctl.backends import Backend
from mlflowctl.errors import EXIT_PLUGIN, PluginError
from mlflowctl.plugin_manager import BUILTIN_PLUGINS, build_plugin_manager


def make_dist(site: Path, dist: str, module: str, source: str, ep_name: str) -> None:
    """A real installed distribution (dist-info with an entry point in the mlflowctl group)."""
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[mlflowctl]\n{ep_name} = {module}\n")
    (info / "RECORD").write_text("")


THIRD_PARTY = """
    from mlflowctl import hookimpl
    from mlflowctl.serving import ServingTarget
    from mlflowctl.stores import Store

    class EchoTarget(ServingTarget):
        name = "echo"
        description = "a third-party target"

    class MemStore(Store):
        scheme = "mem"

    CALLS = []

    @hookimpl
    def mlflowctl_add_serving_targets(registry):
        registry.add_serving_target(EchoTarget)

    @hookimpl
    def mlflowctl_add_stores(registry):
        registry.add_store(MemStore)

    @hookimpl
    def mlflowctl_model_registered(version):
        CALLS.append(version)
"""


@pytest.fixture
def site(tmp_path, monkeypatch):
    path = tmp_path / "site"
    path.mkdir()
    monkeypatch.syspath_prepend(str(path))
    monkeypatch.delenv("MLFLOWCTL_DISABLE_PLUGINS", raising=False)
    return path


def test_builtins_register_and_provide(site):
    pm = build_plugin_manager()
    names = {info.name for info in pm.infos}
    assert {m.rsplit(".", 1)[1] for m in BUILTIN_PLUGINS} <= names
    assert "local" in pm.registry.backends and "file" in pm.registry.stores
    local = next(i for i in pm.infos if i.name == "local_backend")
    assert local.source == "builtin" and "backend local" in local.provides


def test_third_party_entry_point_is_loaded_like_a_builtin(site):
    make_dist(site, "mlflowctl-echo", "mlflowctl_echo", THIRD_PARTY, "echo")
    pm = build_plugin_manager()
    info = next(i for i in pm.infos if i.name == "echo")
    assert info.source == "entry point mlflowctl-echo 1.0"
    assert info.provides == ["store mem", "serving target echo"]
    assert pm.registry.store("mem").__name__ == "MemStore"
    assert "mlflowctl_model_registered" in info.hooks
    assert pm.registry.serving_target("echo").__name__ == "EchoTarget"
    pm.hook.mlflowctl_model_registered(version="v1")
    assert sys.modules["mlflowctl_echo"].CALLS == ["v1"]


@pytest.mark.parametrize("value", ["echo", "all", "other, echo"])
def test_entry_point_plugins_can_be_disabled(site, monkeypatch, value):
    make_dist(site, "mlflowctl-echo", "mlflowctl_echo", THIRD_PARTY, "echo")
    monkeypatch.setenv("MLFLOWCTL_DISABLE_PLUGINS", value)
    pm = build_plugin_manager()
    assert "echo" not in pm.registry.serving_targets
    assert "local" in pm.registry.backends  # built-ins stay


def test_misspelled_hook_is_rejected(site):
    make_dist(site, "mlflowctl-typo", "mlflowctl_typo", """
        from mlflowctl import hookimpl

        @hookimpl
        def mlflowctl_add_backend(registry):
            pass
    """, "typo")
    with pytest.raises(PluginError, match="mlflowctl_add_backend") as info:
        build_plugin_manager()
    assert info.value.exit_code == EXIT_PLUGIN


def test_wrong_hook_arguments_are_rejected(site):
    make_dist(site, "mlflowctl-args", "mlflowctl_args", """
        from mlflowctl import hookimpl

        @hookimpl
        def mlflowctl_add_backends(registry, extra):
            pass
    """, "args")
    with pytest.raises(PluginError, match='plugin "args".*does not fit the hook contract'):
        build_plugin_manager()


def test_broken_import_is_one_line(site):
    make_dist(site, "mlflowctl-broken", "mlflowctl_broken", "import no_such_module_xyz\n", "broken")
    with pytest.raises(PluginError) as info:
        build_plugin_manager()
    assert str(info.value).startswith('Error importing plugin "broken" (entry point mlflowctl-broken 1.0): ModuleNotFoundError')
    assert "MLFLOWCTL_DISABLE_PLUGINS=broken" in str(info.value)


def test_duplicate_names_are_rejected():
    class Twin(Backend):
        name = "local"

    plugin = types.SimpleNamespace(__name__="twin")

    @mlflowctl.hookimpl
    def mlflowctl_add_backends(registry):
        registry.add_backend(Twin)

    plugin.mlflowctl_add_backends = mlflowctl_add_backends
    with pytest.raises(PluginError, match="adds backend 'local', already added by plugin 'local_backend'"):
        build_plugin_manager(extra_plugins=(plugin,), load_entry_points=False)


def test_every_hookspec_is_documented_and_exercised():
    """Each hook has a docstring with :param:/:returns:, and is called somewhere in mlflowctl."""
    src = "".join(p.read_text() for p in Path(mlflowctl.__file__).parent.glob("*.py") if p.name != "hookspecs.py")
    specs = [name for name in dir(hookspecs) if name.startswith("mlflowctl_")]
    assert len(specs) >= 8
    for name in specs:
        doc = getattr(hookspecs, name).__doc__ or ""
        assert ":returns:" in doc and len(doc.split()) > 15, f"{name} is not documented"
        tests_src = "".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
        assert name in src or name.removeprefix("mlflowctl_add_") in src, f"{name} is never called"
        assert name in tests_src, f"{name} has no test"


def test_cli_plugins_lists_sources_and_provides():
    out = subprocess.run([sys.executable, "-m", "mlflowctl.cli", "plugins"], capture_output=True, text=True, check=True)
    assert "local_backend  (builtin, module mlflowctl_plugins.local_backend)" in out.stdout
    assert "provides: backend local" in out.stdout
