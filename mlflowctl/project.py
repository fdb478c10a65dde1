"""One run's view of a project: its config, plugins, store, backend and serving target."""
from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse

from mlflowctl.config import CONFIG_FILE, Config, load_config, public
from mlflowctl.errors import ConfigError
from mlflowctl.plugin_manager import PluginManager, build_plugin_manager
from mlflowctl.state import ensure_state_dir


class Project:
    """Built once per run (per ``doit`` or ``mlflowctl`` invocation), never at import time."""

    def __init__(self, root: Path, overrides: Mapping[str, str] | None = None,
                 extra_plugins: tuple[Any, ...] = (), pm: PluginManager | None = None) -> None:
        self.root = Path(root).resolve()
        self.pm = pm or build_plugin_manager(extra_plugins)
        if not (self.root / CONFIG_FILE).is_file():  # before creating anything in a folder that is no project
            raise ConfigError(f"{self.root / CONFIG_FILE}: not found", hint="run from the project folder, or pass -C")
        self.state_dir = ensure_state_dir(self.root)
        self.config: Config = load_config(self.root / CONFIG_FILE, overrides, self.pm.registry,
                                          cache=self.state_dir / "config.cache.json")
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
