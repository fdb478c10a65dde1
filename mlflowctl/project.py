"""One run's view of a project: its config, plugins, store, backend and serving target."""
from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse

from mlflowctl.config import CONFIG_FILE, Config, load_config, public
from mlflowctl.errors import ConfigError, MlflowctlError
from mlflowctl.plugin_manager import PluginManager, build_plugin_manager
from mlflowctl.state import ensure_state_dir


class Project:
    """Built once per run (per ``doit`` or ``mlflowctl`` invocation), never at import time."""

    def __init__(self, root: Path, overrides: Mapping[str, str] | None = None,
                 extra_plugins: tuple[Any, ...] = (), pm: PluginManager | None = None,
                 stages: Any = None) -> None:
        """``stages``: the project's pipeline (default: what its ``tasks/`` package declares, if any). Their
        settings are part of the schema ``mlflowctl.yaml`` is validated against."""
        self.root = Path(root).resolve()
        self.pm = pm or build_plugin_manager(extra_plugins)
        if not (self.root / CONFIG_FILE).is_file():  # before creating anything in a folder that is no project
            raise ConfigError(f"{self.root / CONFIG_FILE}: not found", hint="run from the project folder, or pass -C")
        self.stages: tuple[Any, ...] = tuple(load_stages(self.root) if stages is None else stages)
        self.state_dir = ensure_state_dir(self.root)
        self.config: Config = load_config(self.root / CONFIG_FILE, overrides, self.pm.registry,
                                          cache=self.state_dir / "config.cache.json", stages=self.stages)
        self.stage_code_dir = self.root / "image"

    @property
    def name(self) -> str:
        return self.config["project"]

    @property
    def model_name(self) -> str:
        return self.config["model_name"]

    def settings(self, section: str, name: str) -> dict[str, Any]:
        return self.config[section][name]

    def public_settings(self, section: str, name: str) -> dict[str, Any]:
        cls = {"backends": self.pm.registry.backends, "stores": self.pm.registry.stores,
               "serving": self.pm.registry.serving_targets}[section][name]
        return public(self.settings(section, name), dict(cls.settings))

    @cached_property
    def backend(self) -> Any:
        name = self.config["backend"]
        cls = self.pm.registry.backend(name)
        return cls(self.settings("backends", name), self)

    def backend_named(self, name: str) -> Any:
        """The backend ``name`` with its configured settings (the selected one is :attr:`backend`)."""
        if name == self.config["backend"]:
            return self.backend
        cls = self.pm.registry.backend(name)
        return cls(self.settings("backends", name), self)

    @cached_property
    def store(self) -> Any:
        url = self.config["store"]
        scheme = urlparse(url).scheme
        if not scheme:
            raise ConfigError(f"{CONFIG_FILE}: store: expected a URL such as file://.mlflowctl/store or s3://bucket/prefix, got {url!r}")
        cls = self.pm.registry.store(scheme)
        return cls(url, self.settings("stores", scheme), self)

    @cached_property
    def serving(self) -> Any:
        name = self.config["serving"]["target"]
        cls = self.pm.registry.serving_target(name)
        return cls(self.settings("serving", name), self)

    @cached_property
    def models(self) -> Any:
        from mlflowctl.model_registry import ModelRegistry

        return ModelRegistry(self.store, self.model_name)


PIPELINE_PACKAGE = "tasks"  # the project's stage declarations: tasks/__init__.py, its STAGES


def load_stages(root: Path) -> tuple[Any, ...]:
    """The stages the project at ``root`` declares: ``STAGES`` of its ``tasks/`` package (none without one).

    The package is imported from its file under a name of its own per project folder (so two projects in
    one process never share ``tasks``), not by running ``dodo.py``.
    """
    import hashlib
    import importlib.util
    import sys

    from mlflowctl.pipeline import Stage

    init = Path(root).resolve() / PIPELINE_PACKAGE / "__init__.py"
    if not init.is_file():
        return ()
    name = "_mlflowctl_project_" + hashlib.sha256(str(init).encode()).hexdigest()[:16]
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except MlflowctlError:
            sys.modules.pop(name, None)
            raise
        except Exception as exc:  # the project's own code: one line naming it, not a traceback
            sys.modules.pop(name, None)
            raise ConfigError(f"{init}: cannot load the pipeline: {type(exc).__name__}: {exc}",
                              hint="fix the stage declarations in tasks/") from None
    stages = getattr(module, "STAGES", None)
    if not isinstance(stages, (list, tuple)) or not all(isinstance(s, Stage) for s in stages):
        raise ConfigError(f"{init}: expected STAGES, a list of mlflowctl.pipeline.Stage",
                          hint="declare the pipeline as STAGES = (Stage(...), ...)")
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ConfigError(f"{init}: stage names must be unique, got {', '.join(names)}")
    return tuple(stages)
