"""Build the plugin manager for one run, and the registry the plugins fill.

Built-in plugins and third-party ones travel the same road: each is a module
name handed to :func:`register`. The built-ins are the modules in
``BUILTIN_PLUGINS``; third parties declare an entry point in the
``mlflowctl`` group. ``MLFLOWCTL_DISABLE_PLUGINS`` turns entry-point plugins
off: ``all``, or a comma-separated list of entry-point names.
"""
from __future__ import annotations

import difflib
import importlib
import os
import traceback
from dataclasses import dataclass, field
from typing import Any

import pluggy

from mlflowctl import hookspecs
from mlflowctl.errors import ConfigError, MlflowctlError, PluginError

ENTRY_POINT_GROUP = "mlflowctl"
DISABLE_ENV = "MLFLOWCTL_DISABLE_PLUGINS"

BUILTIN_PLUGINS = (
    "mlflowctl_plugins.local_backend",
    "mlflowctl_plugins.docker_backend",
    "mlflowctl_plugins.local_store",
    "mlflowctl_plugins.s3_store",
    "mlflowctl_plugins.local_serving",
    "mlflowctl_plugins.k8s_backend",
    "mlflowctl_plugins.pvc_store",
)


@dataclass
class PluginInfo:
    """What ``mlflowctl plugins`` shows about one plugin."""

    name: str
    source: str  # "builtin" or "entry point <dist> <version>"
    module: str
    hooks: list[str] = field(default_factory=list)
    provides: list[str] = field(default_factory=list)


class Registry:
    """The backends, stores and serving targets of one run, by name.

    Handed to the ``mlflowctl_add_*`` hooks. Each added class names itself
    (``name`` for backends and targets, ``scheme`` for stores).
    """

    def __init__(self) -> None:
        self.backends: dict[str, type] = {}
        self.stores: dict[str, type] = {}
        self.serving_targets: dict[str, type] = {}
        self.origin: dict[tuple[str, str], str] = {}
        self._current_plugin = "?"

    def _add(self, kind: str, table: dict[str, type], key: str, cls: type) -> None:
        if not isinstance(key, str) or not key:
            raise PluginError(f"plugin {self._current_plugin!r} added a {kind} class {cls!r} without a name")
        if key in table and table[key] is not cls:
            raise PluginError(
                f"plugin {self._current_plugin!r} adds {kind} {key!r}, "
                f"already added by plugin {self.origin[(kind, key)]!r}",
                hint=f"disable one of them with {DISABLE_ENV}",
            )
        table[key] = cls
        self.origin[(kind, key)] = self._current_plugin

    def add_backend(self, cls: type) -> None:
        """Add an execution backend class (see :class:`mlflowctl.backends.Backend`)."""
        self._add("backend", self.backends, getattr(cls, "name", None), cls)

    def add_store(self, cls: type) -> None:
        """Add an artifact store class (see :class:`mlflowctl.stores.Store`)."""
        self._add("store", self.stores, getattr(cls, "scheme", None), cls)

    def add_serving_target(self, cls: type) -> None:
        """Add a serving target class (see :class:`mlflowctl.serving.ServingTarget`)."""
        self._add("serving target", self.serving_targets, getattr(cls, "name", None), cls)

    @staticmethod
    def _lookup(kind: str, table: dict[str, type], key: str, where: str) -> type:
        try:
            return table[key]
        except KeyError:
            close = difflib.get_close_matches(key, table, n=1)
            guess = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"{where}: unknown {kind} {key!r}{guess} known: {', '.join(sorted(table)) or 'none'}",
                hint="mlflowctl plugins lists what each plugin provides",
            ) from None

    def backend(self, name: str) -> type:
        return self._lookup("backend", self.backends, name, "backend")

    def store(self, scheme: str) -> type:
        return self._lookup("store scheme", self.stores, scheme, "store")

    def serving_target(self, name: str) -> type:
        return self._lookup("serving target", self.serving_targets, name, "serving.target")


class PluginManager(pluggy.PluginManager):
    """pluggy's manager plus the run's :class:`Registry` and plugin provenance."""

    def __init__(self) -> None:
        super().__init__("mlflowctl")
        self.add_hookspecs(hookspecs)
        self.registry = Registry()
        self.infos: list[PluginInfo] = []


def _guarded_hook(plugin: str, hook: str, function: Any) -> Any:
    """``function`` whose unexpected exceptions (not ``MlflowctlError``) become one line naming the plugin."""
    import functools

    @functools.wraps(function)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except MlflowctlError:
            raise
        except Exception as exc:  # noqa: BLE001 - a plugin's bug: one line, exit 4, no traceback
            raise plugin_bug(plugin, hook, exc) from exc

    return guarded


def plugin_bug(plugin: str, where: str, exc: BaseException) -> PluginError:
    """The one line (exit 4) for ``exc``, an unexpected exception of plugin ``plugin``'s ``where``."""
    text = " ".join(str(exc).split())[:300]
    return PluginError(f'plugin "{plugin}" failed in {where}: {type(exc).__name__}' + (f": {text}" if text else ""),
                       hint=f"a bug in that plugin; fix or uninstall it, or set {DISABLE_ENV}={plugin}")


def register(pm: PluginManager, module_name: str, name: str, source: str, loader: Any = None) -> None:
    """Import one plugin module and register it: the single path for every plugin.

    :param loader: a callable returning the plugin object (an entry point's
        ``load``); by default the module ``module_name`` is imported.
    """
    try:
        plugin = loader() if loader else importlib.import_module(module_name)
    except Exception as exc:  # a broken third-party plugin must not crash with a traceback
        raise PluginError(
            f'Error importing plugin "{name}" ({source}): {type(exc).__name__}: {exc}',
            hint=f"fix or uninstall it, or set {DISABLE_ENV}={name}",
        ) from exc
    try:
        pm.register(plugin, name=name)
    except (pluggy.PluginValidationError, ValueError) as exc:
        raise PluginError(f'plugin "{name}" ({source}) does not fit the hook contract: {exc}') from exc
    for caller in pm.get_hookcallers(plugin) or ():
        for impl in caller.get_hookimpls():
            if impl.plugin is plugin and not (impl.hookwrapper or getattr(impl, "wrapper", False)):
                impl.function = _guarded_hook(name, caller.name, impl.function)
    hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or ())
    pm.infos.append(PluginInfo(name=name, source=source, module=getattr(plugin, "__name__", module_name), hooks=hooks))


def _entry_points() -> list[Any]:
    from importlib.metadata import entry_points

    return sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def build_plugin_manager(extra_plugins: tuple[Any, ...] = (), load_entry_points: bool = True) -> PluginManager:
    """Build a fresh plugin manager for one run.

    Registers the built-ins, then entry-point plugins (unless disabled), then
    ``extra_plugins`` (objects, used by tests and embedding code). Rejects
    hook implementations that match no specification, then lets every plugin
    fill the registry.
    """
    pm = PluginManager()
    for module_name in BUILTIN_PLUGINS:
        register(pm, module_name, name=module_name.rsplit(".", 1)[-1], source="builtin")
    if load_entry_points:
        disabled = {p.strip() for p in os.environ.get(DISABLE_ENV, "").split(",") if p.strip()}
        if "all" not in disabled:
            for ep in _entry_points():
                if ep.name in disabled or pm.has_plugin(ep.name):
                    continue
                dist = getattr(ep, "dist", None)
                source = f"entry point {dist.name} {dist.version}" if dist else "entry point"
                register(pm, ep.value, name=ep.name, source=source, loader=ep.load)
    for i, plugin in enumerate(extra_plugins):
        name = getattr(plugin, "__name__", None) or f"{type(plugin).__name__}-{i}"
        register(pm, name, name=name, source="extra", loader=lambda p=plugin: p)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"{exc}", hint="hook names start with mlflowctl_; see mlflowctl/hookspecs.py") from exc
    _fill_registry(pm)
    return pm


#: module name -> the plugin whose code it is: each plugin's own module and the modules of the classes it
#: added (process-wide: blame() is asked where no plugin manager is at hand, e.g. the CLI's last resort)
PLUGIN_MODULES: dict[str, str] = {}


def blame(exc: BaseException) -> PluginError | None:
    """The one line for an unexpected exception that a plugin's code raised, or ``None`` when it was not one.

    Hooks and serving targets are wrapped where they are called; a backend's or a store's methods are not
    (their callers catch the ``OSError`` a store raises by contract), so the CLI and the doit tasks ask this
    about any other exception: when a frame of a plugin's module is on its traceback, it becomes
    ``PluginError`` naming the innermost such plugin and the method through which the core entered it
    (exit 4, no traceback); otherwise it is the core's own bug and keeps its traceback.
    """
    culprit, previous = None, None
    for frame, _ in traceback.walk_tb(exc.__traceback__):  # outermost first
        plugin = PLUGIN_MODULES.get(frame.f_globals.get("__name__", ""))
        if plugin is not None and plugin != previous:  # where the core called into the plugin: its method
            culprit = (plugin, frame.f_code.co_name)
        previous = plugin
    if culprit is None:
        return None
    plugin, function = culprit
    return plugin_bug(plugin, f"{function}()", exc)


def _fill_registry(pm: PluginManager) -> None:
    registry = pm.registry
    by_name = {info.name: info for info in pm.infos}
    for info in pm.infos:
        PLUGIN_MODULES.setdefault(info.module, info.name)
    for hook_name, kind, table in (
        ("mlflowctl_add_backends", "backend", registry.backends),
        ("mlflowctl_add_stores", "store", registry.stores),
        ("mlflowctl_add_serving_targets", "serving target", registry.serving_targets),
    ):
        hook = getattr(pm.hook, hook_name)
        for impl in hook.get_hookimpls():
            registry._current_plugin = impl.plugin_name
            before = set(table)
            impl.function(**{name: registry for name in impl.argnames})  # guarded: a bug is one PluginError line
            info = by_name.get(impl.plugin_name)
            if info is not None:
                info.provides.extend(f"{kind} {key}" for key in sorted(set(table) - before))
            for key in set(table) - before:
                PLUGIN_MODULES.setdefault(table[key].__module__, impl.plugin_name)
    registry._current_plugin = "?"
