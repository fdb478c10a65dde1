"""``mlflowctl.yaml``: the schema, loading, validation and ``key=value`` overrides.

The schema is a table of known keys (like doit's table of task fields):
nested dicts are sections, :class:`Setting` objects are leaves. Plugins add
the sections for their own settings (``backends.<name>``,
``stores.<scheme>``, ``serving.<target>``) through the ``settings``
attribute of their classes. Every error names the file, the key path and
what was expected, on one line.
"""
from __future__ import annotations

import difflib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping

from mlflowctl.errors import ConfigError

CONFIG_FILE = "mlflowctl.yaml"


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()

_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               list: "a list", dict: "a mapping"}


@dataclass(frozen=True)
class Setting:
    """One configuration key: its type, default, and what it means.

    ``secret`` settings may be given as ``{"$env": "VAR"}`` or
    ``{"$file": "path"}``; they are resolved at load time and never enter a
    cache key, a log or a model's metadata.
    """

    type: type
    default: Any = REQUIRED
    help: str = ""
    choices: tuple[Any, ...] = ()
    secret: bool = False
    env: str = ""  # stage settings: the environment variable the stage sees it as (default: the key in upper case)
    check: Any = None  # check(value) -> None if valid, else what was expected (e.g. a Kubernetes quantity)
    min: float | None = None  # numbers: the smallest allowed value (inclusive)
    max: float | None = None  # numbers: the largest allowed value (inclusive)

    def coerce(self, value: Any, where: str, resolve: bool = True) -> Any:
        """Check (and for strings from the command line, convert) ``value``.

        Errors never show the value of a ``secret`` setting. With
        ``resolve=False`` (a plugin that is not selected) a secret reference
        is checked but not resolved.
        """
        t = self.type
        if self.secret and isinstance(value, Mapping):
            if not resolve:
                check_secret_reference(value, where)
                return dict(value)
            value = resolve_secret(value, where)
        shown = (lambda v: "a secret value") if self.secret else repr
        if isinstance(value, str) and t is not str:
            value = _parse_string(value, t, where, shown)
        if t is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if t is list and isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, t) or (t is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: expected {_TYPE_NAMES.get(t, t.__name__)}, got {shown(value)}")
        if t is float and not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {shown(value)}")
        if (self.min is not None and value < self.min) or (self.max is not None and value > self.max):
            low = "" if self.min is None else f"{self.min:g}"
            high = "" if self.max is None else f"{self.max:g}"
            bound = f"between {low} and {high}" if low and high else (f"at least {low}" if low else f"at most {high}")
            raise ConfigError(f"{where}: expected a number {bound}, got {shown(value)}")
        if self.choices and value not in self.choices:
            raise ConfigError(f"{where}: expected one of {', '.join(map(str, self.choices))}, got {shown(value)}")
        if self.check is not None:
            for item in (value if isinstance(value, list) else [value]):
                problem = self.check(item)
                if problem:
                    raise ConfigError(f"{where}: {problem}, got {shown(item)}")
        return value


def _parse_string(text: str, t: type, where: str, shown: Any = repr) -> Any:
    try:
        if t is bool:
            low = text.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if t is int:
            return int(text)
        if t is float:
            return float(text)
        if t in (list, dict):
            if text.strip().startswith(("[", "{")):
                return json.loads(text)
            if t is list:
                return [item.strip() for item in text.split(",") if item.strip()]
    except ValueError:
        pass
    raise ConfigError(f"{where}: expected {_TYPE_NAMES.get(t, t.__name__)}, got {shown(text)}")


SECRET_FILE_LIMIT = 64 * 1024


def check_secret_reference(value: Mapping[str, Any], where: str) -> None:
    """``{"$env": "VAR"}`` or ``{"$file": "path"}`` with a string, else one line saying so."""
    if len(value) == 1 and set(value) <= {"$env", "$file"}:
        (kind, target), = value.items()
        if isinstance(target, str) and target:
            return
        raise ConfigError(f'{where}: {{"{kind}": ...}} takes a non-empty string ({"a variable name" if kind == "$env" else "a path"}), '
                          f"got {type(target).__name__}")
    raise ConfigError(f'{where}: a secret is a string, {{"$env": "VAR"}} or {{"$file": "path"}}, '
                      f"got a mapping with keys {', '.join(sorted(map(str, value)))}")


def resolve_secret(value: Mapping[str, Any], where: str) -> str:
    """Resolve ``{"$env": VAR}`` / ``{"$file": path}`` at read time (a file: at most 64 KiB)."""
    check_secret_reference(value, where)
    if "$env" in value:
        var = value["$env"]
        if var not in os.environ:
            raise ConfigError(f"{where}: environment variable {var} is not set", hint=f"export {var}=...")
        return os.environ[var]
    name = value["$file"]
    try:
        with open(os.path.expanduser(name), "rb") as fh:
            data = fh.read(SECRET_FILE_LIMIT + 1)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read secret file {name}: {exc.strerror}") from None
    if len(data) > SECRET_FILE_LIMIT:
        raise ConfigError(f"{where}: secret file {name} is larger than {SECRET_FILE_LIMIT // 1024} KiB")
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: secret file {name} is not UTF-8 text") from None


_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def check_model_name(value: Any) -> str | None:
    """A model name is one path segment a URL, a folder and a Kubernetes label can all hold."""
    if (not isinstance(value, str) or not 1 <= len(value) <= 63 or not set(value) <= _NAME_CHARS
            or not value[0].isalnum() or not value[-1].isalnum() or ".." in value):
        return ("expected a name of 1-63 letters, digits, '.', '_' or '-', starting and ending with a letter "
                "or digit (e.g. churn)")
    return None


class Configurable:
    """What backends, stores and serving targets share: declared settings and the run's project.

    ``settings`` declares the keys of the plugin's section of ``mlflowctl.yaml``
    (``backends.<name>``, ``stores.<scheme>``, ``serving.<name>``); an
    instance gets the validated values as ``self.config``.
    """

    description: ClassVar[str] = ""
    settings: ClassVar[dict[str, Setting]] = {}

    def __init__(self, settings: dict[str, Any], project: Any) -> None:
        self.config = settings
        self.project = project

    def preflight(self) -> None:
        """Check the plugin can work at all (daemon reachable, folder writable); raise an
        ``MlflowctlError`` saying what to do."""

    def setting(self, key: str) -> Any:
        """The value of one of ``settings``: as configured, or its declared default when unset or empty."""
        value = self.config.get(key) if isinstance(self.config, dict) else None
        return self.settings[key].default if value in (None, "") else value


# Plugin sections: the name of the key in the section that selects the plugin, and the registry table.
PLUGIN_SECTIONS = {"backends": "backends", "stores": "stores", "serving": "serving_targets"}


SCHEMA: dict[str, Any] = {
    "project": Setting(str, "mlflowctl", "project name: names images, jobs and the state folder's content"),
    "model_name": Setting(str, "model", "name of the model in the registry (models/<name>/<N>/)",
                          check=check_model_name),
    "backend": Setting(str, "local", "where stages run: local, docker, k8s, or a plugin's backend"),
    "store": Setting(str, "file://.mlflowctl/store", "artifact store URL: file://path, s3://bucket/prefix, pvc://claim/path"),
    "backends": {},
    "stores": {},
    "serving": {"target": Setting(str, "local", "serving target: local, tfserving, seldon, hydrosphere, or a plugin's")},
}


@dataclass
class Config:
    """The validated configuration: plain nested dicts plus where each value came from."""

    data: dict[str, Any]
    path: Path
    overrides: dict[str, str] = field(default_factory=dict)
    schema: dict[str, Any] = field(default_factory=dict)  # what it was validated against

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, dotted: str, default: Any = None) -> Any:
        node: Any = self.data
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(sorted(known))}"


def _validate_section(raw: Any, schema: dict[str, Any], where: str, fname: str,
                      unselected: frozenset[str] = frozenset()) -> dict[str, Any]:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{fname}: {where or 'top level'}: expected a mapping, got {raw!r}")
    out: dict[str, Any] = {}
    for key in raw:
        if key not in schema:
            path = f"{where}.{key}" if where else str(key)
            raise ConfigError(f"{fname}: {path}: unknown key{_suggest(str(key), list(schema))}")
    for key, spec in schema.items():
        path = f"{where}.{key}" if where else key
        if isinstance(spec, Setting):
            if key in raw and raw[key] is not None:
                out[key] = spec.coerce(raw[key], f"{fname}: {path}", resolve=where not in unselected)
            elif spec.default is REQUIRED:
                raise ConfigError(f"{fname}: {path}: missing value ({spec.help})")
            else:
                out[key] = list(spec.default) if isinstance(spec.default, list) else spec.default
        else:
            out[key] = _validate_section(raw.get(key), spec, path, fname, unselected)
    return out


def full_schema(registry: Any = None, stages: Any = ()) -> dict[str, Any]:
    """The schema of one project: the core's own keys, each plugin's section (``backends.docker``,
    ``serving.local``, ...) and each stage's section (the settings the stage declares)."""
    schema = {k: (dict(v) if isinstance(v, dict) else v) for k, v in SCHEMA.items()}
    if registry is not None:
        for section, table in PLUGIN_SECTIONS.items():
            for name, cls in getattr(registry, table).items():
                schema[section][name] = dict(getattr(cls, "settings", {}) or {})
    for section, settings in stage_sections(stages).items():
        if section in schema:
            raise ConfigError(f"stage section {section!r}: the name is a key of mlflowctl itself",
                              hint="name the stage (or its params section) differently")
        schema[section] = settings
    return schema


def stage_sections(stages: Any) -> dict[str, dict[str, Setting]]:
    """``{section: settings}`` declared by ``stages`` (objects with ``section`` and ``settings``); two stages
    sharing a section must declare the same settings."""
    sections: dict[str, dict[str, Setting]] = {}
    for stage in stages:
        declared = dict(getattr(stage, "settings", None) or {})
        if not declared:
            continue
        section = stage.section
        if section in sections and sections[section] != declared:
            raise ConfigError(f"stage {stage.name}: section {section!r} is declared twice with different settings",
                              hint="declare the settings on one stage; the other names the section with params=")
        sections[section] = declared
    return sections


def parse_override(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. backend=docker or <stage>.<setting>=<value>")
    key, value = item.split("=", 1)
    return key.strip(), value


def apply_overrides(raw: dict[str, Any], overrides: Mapping[str, str], schema: dict[str, Any]) -> None:
    """Set ``a.b.c=value`` overrides into ``raw`` (before validation coerces them)."""
    for dotted, value in overrides.items():
        node, spec = raw, schema
        parts = dotted.split(".")
        for i, part in enumerate(parts):
            where = ".".join(parts[: i + 1])
            if not isinstance(spec, dict) or part not in spec:
                known = list(spec) if isinstance(spec, dict) else []
                raise ConfigError(f"override {dotted}={value}: {where}: unknown key{_suggest(part, known)}")
            spec = spec[part]
            if i == len(parts) - 1:
                if not isinstance(spec, Setting):
                    raise ConfigError(f"override {dotted}={value}: {where} is a section, not a value")
                node[part] = value
            else:
                child = node.get(part)
                if not isinstance(child, dict):
                    child = node[part] = {}
                node = child


def read_yaml(path: Path, cache: Path | None = None) -> dict[str, Any]:
    """Parse ``mlflowctl.yaml``; with ``cache``, reuse the last parse while the file is unchanged.

    The cache (a JSON copy keyed by the sha256 of the file's bytes) spares
    every no-op ``doit`` the import of PyYAML.
    """
    import hashlib

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found", hint="create it, or run from the project folder") from None
    stamp = hashlib.sha256(data).hexdigest()
    if cache is not None:
        try:
            cached = json.loads(cache.read_text())
            if cached.get("stamp") == stamp:
                return cached["raw"]
        except (OSError, ValueError, AttributeError, KeyError):
            pass
    raw = _parse_yaml(path, data.decode("utf-8", errors="replace"))
    if cache is not None and cache.parent.is_dir():
        try:
            tmp = cache.with_name(f".{cache.name}.{os.getpid()}")
            tmp.write_text(json.dumps({"stamp": stamp, "raw": raw}))
            os.replace(tmp, cache)
        except (OSError, TypeError, ValueError):  # not JSON-able (dates...): just don't cache
            pass
    return raw


def _parse_yaml(path: Path, text: str) -> dict[str, Any]:
    import yaml

    try:
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        raw = yaml.load(text, Loader=loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path.name}:{at}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path.name}: expected a mapping at the top level")
    _check_size(raw, path)
    return raw


MAX_CONFIG_VALUES = 100_000


def _check_size(raw: Any, path: Path) -> None:
    """Refuse a config whose YAML aliases expand it beyond any real one (a "billion laughs")."""
    budget, stack = MAX_CONFIG_VALUES, [raw]
    while stack:
        node = stack.pop()
        budget -= 1
        if budget < 0:
            raise ConfigError(f"{path.name}: expands to more than {MAX_CONFIG_VALUES} values "
                              f"(YAML aliases repeating a large block?)", hint="write the values out, without aliases")
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def load_config(path: Path, overrides: Mapping[str, str] | None = None, registry: Any = None,
                cache: Path | None = None, stages: Any = ()) -> Config:
    """Read, override and validate ``mlflowctl.yaml`` against the schema assembled from the core, the plugins
    of ``registry`` and ``stages`` (``cache``: see :func:`read_yaml`)."""
    schema = full_schema(registry, stages)
    raw = read_yaml(path, cache)
    overrides = dict(overrides or {})
    apply_overrides(raw, overrides, schema)
    if registry is not None:
        _check_plugin_sections(raw, schema, path.name)
    data = _validate_section(raw, schema, "", path.name, _unselected_plugins(raw, schema))
    return Config(data=data, path=path, overrides=overrides, schema=schema)


_PLUGIN_KINDS = {"backends": "backend", "stores": "store", "serving": "serving target"}


def _check_plugin_sections(raw: dict[str, Any], schema: dict[str, Any], fname: str) -> None:
    """A section for a plugin that is not installed: a typo of an installed one is an unknown key with a
    "did you mean"; anything else says the plugin is not installed, instead of a bare "unknown key"."""
    for section in PLUGIN_SECTIONS:
        given = raw.get(section)
        if not isinstance(given, dict):
            continue
        known = [name for name, spec in schema[section].items() if isinstance(spec, dict)]
        for name in given:
            if name in schema[section] or difflib.get_close_matches(str(name), known, n=1):
                continue  # known, or a typo: _validate_section says "did you mean"
            kind = _PLUGIN_KINDS[section]
            raise ConfigError(f"{fname}: {section}.{name}: unknown key: no installed plugin provides the {kind} "
                              f"{name!r} (installed: {', '.join(sorted(known)) or 'none'})",
                              hint=f"install the plugin that provides the {kind} {name!r} (mlflowctl plugins lists "
                                   f"what is installed), or remove the section {section}.{name}")


def _unselected_plugins(raw: dict[str, Any], schema: dict[str, Any]) -> frozenset[str]:
    """``backends.docker``, ``stores.s3``, ...: plugin sections whose secrets are not resolved (not used)."""
    from urllib.parse import urlparse

    def chosen(value: Any, default: str) -> str:
        return value if isinstance(value, str) else default

    serving = raw.get("serving") if isinstance(raw.get("serving"), dict) else {}
    selected = {
        "backends": chosen(raw.get("backend"), SCHEMA["backend"].default),
        "stores": urlparse(chosen(raw.get("store"), SCHEMA["store"].default)).scheme,
        "serving": chosen(serving.get("target"), SCHEMA["serving"]["target"].default),
    }
    return frozenset(f"{section}.{name}" for section in PLUGIN_SECTIONS
                     for name in schema.get(section, {}) if isinstance(schema[section][name], dict)
                     and name != selected[section])


def stage_env(settings: Mapping[str, Setting], values: dict[str, Any]) -> dict[str, str]:
    """The environment variables a stage sees for the settings it declares: ``env`` (default: the key in
    upper case) set to the validated value (lists and mappings as JSON)."""
    env = {}
    for key, spec in settings.items():
        if not isinstance(spec, Setting):
            continue
        value = values[key]
        env[spec.env or key.upper()] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return env


def public(values: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """``values`` without secret settings: what may enter cache keys, logs and metadata."""
    out = {}
    for key, value in values.items():
        spec = schema.get(key)
        if isinstance(spec, Setting) and spec.secret:
            continue
        out[key] = public(value, spec) if isinstance(value, dict) and isinstance(spec, dict) else value
    return out
