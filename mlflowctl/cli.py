"""The ``mlflowctl`` command: inspect plugins, stages, model versions and the local server.

The pipeline itself runs with ``doit`` (``doit``, ``doit backend=docker``).
Imports stay lazy so ``mlflowctl --help`` starts at once.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from mlflowctl.errors import EXIT_CONFIG, EXIT_OK, MlflowctlError

EXIT_CODES = """\
exit codes: 0 ok, 1 a stage failed, 2 a stage could not run, 3 bad config or input,
            4 plugin error, 5 external system unreachable, 6 quality gate failed"""


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mlflowctl", description="Inspect the pipeline run by `doit`: plugins, stages, model versions, serving.",
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-C", "--project", default=".", help="project folder (holding mlflowctl.yaml and dodo.py)")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, help: str, action: tuple[str, ...] = ()) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        if action:  # `serve status key=value` as well as `serve key=value status`: sorted out in _main
            p.add_argument("words", nargs="*", metavar="|".join(action),
                           help="what to do, and key=value config overrides (as for doit), in any order")
            p.set_defaults(action_choices=action)
        else:
            p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for doit")
        return p

    add("plugins", "list every plugin, where it came from, and what it provides")
    add("status", "each stage: up to date, or why it will re-run")
    add("models", "registered model versions, their metrics and serving state")
    config = add("config", "the effective configuration after overrides (secrets hidden)")
    config.add_argument("--settings", action="store_true",
                        help="list every setting instead: key, type, default, range or choices, and what it means "
                             "(declared by the core, the plugins and the project's stages)")
    add("serve", "start, stop or inspect the serving target", action=("start", "stop", "status"))
    add("rollback", "make the previous stable version stable again")
    add("report", "the stable endpoint, its tested accuracy and the live drift rate")
    add("monitor", "run the monitor stage now on the live traffic (report under .mlflowctl/monitor/<time>/)")
    render = add("render", "write what the backend would run for each stage (scripts, Dockerfile, Kubernetes "
                           "manifests) and what it needs set up first, without running or applying anything")
    render.add_argument("--out", default=".mlflowctl/render", help="folder to write into")
    setup = add("setup", "create what the backend needs before a run (k8s: ServiceAccount, Role, RoleBinding, "
                         "the store's claim)")
    setup.add_argument("--dry-run", action="store_true", help="ask the server to validate, change nothing")
    export_help = ("write the pipeline for another orchestrator: argo, an argoproj.io/v1alpha1 Workflow "
                   "(stages as the k8s backend's Jobs/TFJobs; `| argo submit -`)")
    export = sub.add_parser("export", help=export_help, description=export_help)
    export.add_argument("format", choices=("argo",), help="what to write")
    export.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for doit")
    export.add_argument("--out", default="-", help="file to write (default -: stdout)")
    export.add_argument("--stage", action="append", default=[], metavar="NAME",
                        help="only NAME and the stages it needs (repeatable; default: every stage)")
    export.add_argument("--runner-image", default="", help="image of the orchestrator stages (register, deploy, "
                                                             "promote); default <project image repo>-runner:<tag>")
    prune = add("prune", "remove old stage images and leftover containers of the docker backend")
    prune.add_argument("--keep", type=int, default=1, help="newest images to keep")
    plugin = sub.add_parser("plugin", help="write a new plugin distribution: plugin new serving NAME",
                            description="write a new plugin distribution, ready to adapt and passing the "
                                        "conformance kit: mlflowctl plugin new serving NAME")
    plugin.add_argument("verb", choices=("new",))
    plugin.add_argument("kind", choices=("serving",), help="what the plugin provides")
    plugin.add_argument("name", help="the plugin's name (serving.target: NAME); lower-case, digits, _")
    plugin.add_argument("--dir", default=None, help="folder to write into (default: ./mlflowctl-NAME)")
    plugin.set_defaults(overrides=[])
    ui = add("ui", "a read-only local web page: pipeline, model versions, gate verdicts, drift (live)")
    ui.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (default 8765; 0: any free port)")
    return parser


class _Parser(argparse.ArgumentParser):
    """Bad command-line input is a usage line plus one error line, with the config exit code (3)."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"mlflowctl: {message}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG)


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
        return code
    except BrokenPipeError:  # ``mlflowctl status | head``: the reader left; that is not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


def _main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.version:
        from mlflowctl import __version__

        print(f"mlflowctl {__version__}")
        return EXIT_OK
    if not args.command:
        _parser().print_help()
        return EXIT_OK
    if getattr(args, "action_choices", None):
        _split_action(args)
    try:
        from mlflowctl.config import parse_override

        overrides = dict(parse_override(item) for item in args.overrides)
        handler = globals()[f"cmd_{args.command}"]
        return handler(Path(args.project), overrides, args) or EXIT_OK
    except MlflowctlError as exc:
        print(f"mlflowctl: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("mlflowctl: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        from mlflowctl.plugin_manager import blame

        line = blame(exc)
        if line is None:  # the core's own bug: its traceback is the report
            raise
        print(f"mlflowctl: {line}", file=sys.stderr)
        return line.exit_code


def _split_action(args: Any) -> None:
    """``words`` -> ``action`` (exactly one of the choices) and ``overrides`` (the key=value words)."""
    actions = [w for w in args.words if "=" not in w]
    args.overrides = [w for w in args.words if "=" in w]
    choices = args.action_choices
    if len(actions) == 1 and actions[0] in choices:
        args.action = actions[0]
        return
    if len(actions) == 1:
        problem = f"invalid choice: {actions[0]!r} (choose from {', '.join(choices)})"
    else:
        got = f", got {' '.join(actions)!r}" if actions else " (key=value overrides may come before or after it)"
        problem = f"expected one of {', '.join(choices)}{got}"
    print(f"usage: mlflowctl {args.command} {'|'.join(choices)} [key=value ...]", file=sys.stderr)
    print(f"mlflowctl: argument action: {problem}", file=sys.stderr)
    raise SystemExit(EXIT_CONFIG)


def _project(root: Path, overrides: dict[str, str]) -> Any:
    from mlflowctl.project import Project

    return Project(root, overrides)


def load_pipeline(root: Path, overrides: dict[str, str]) -> Any:
    """The project's pipeline as its ``tasks/`` declare it (the same ``dodo.py`` hands to doit), without doit."""
    from mlflowctl.pipeline import Pipeline

    return Pipeline(_project(root, overrides))


def cmd_plugins(root: Path, overrides: dict[str, str], args: Any) -> int:
    from mlflowctl.plugin_manager import build_plugin_manager

    pm = build_plugin_manager()
    for info in pm.infos:
        print(f"{info.name}  ({info.source}, module {info.module})")
        if info.provides:
            print(f"    provides: {', '.join(info.provides)}")
        if info.hooks:
            print(f"    hooks:    {', '.join(info.hooks)}")
    print()
    for kind, section, table in (("backend", "backends", pm.registry.backends), ("store", "stores", pm.registry.stores),
                                 ("serving target", "serving", pm.registry.serving_targets)):
        for name, cls in sorted(table.items()):
            print(f"{kind} {name}: {getattr(cls, 'description', '') or '(no description)'}")
            for line in describe_settings(getattr(cls, "settings", {}) or {}, f"{section}.{name}."):
                print(f"    {line}")
    return EXIT_OK


def _describe_setting(setting: Any) -> str:
    """``int, default 8501, 1..65535``: a setting's type, default and allowed values, for people."""
    from mlflowctl.config import REQUIRED

    parts = [getattr(setting.type, "__name__", str(setting.type))]
    if setting.secret:
        parts.append("secret")
    parts.append("required" if setting.default is REQUIRED
                 else "default (hidden)" if setting.secret and setting.default else f"default {setting.default}")
    if setting.min is not None or setting.max is not None:
        low = "" if setting.min is None else f"{setting.min:g}"
        high = "" if setting.max is None else f"{setting.max:g}"
        parts.append(f"{low}..{high}")
    if setting.choices:
        parts.append(f"one of {'|'.join(map(str, setting.choices))}")
    return ", ".join(parts)


def cmd_status(root: Path, overrides: dict[str, str], args: Any) -> int:
    pipeline = load_pipeline(root, overrides)
    if not pipeline.stages:
        from mlflowctl.project import PIPELINE_PACKAGE

        print(f"no stages: the project declares none ({PIPELINE_PACKAGE}/__init__.py, STAGES = (Stage(...), ...))")
        return EXIT_OK
    width = max(len(name) for name in pipeline.stages)
    for name, stage in pipeline.stages.items():
        fresh, reasons = pipeline.explain(stage)
        state = "up to date" if fresh else "will run: " + "; ".join(reasons)
        print(f"{name:<{width}}  {state}")
    return EXIT_OK


def cmd_models(root: Path, overrides: dict[str, str], args: Any) -> int:
    project = _project(root, overrides)
    registry = project.models
    versions = registry.versions()
    if not versions:
        print(f"model {registry.name}: no versions yet (run: doit)")
        return EXIT_OK
    labels = registry.labels()
    by_number: dict[int, list[str]] = {}
    for label, number in labels.items():
        by_number.setdefault(number, []).append(label)
    print(f"model {registry.name} in {project.store.url}")
    shown = _distinguishing_params([v.metadata.get("params") or {} for v in versions])
    for v in versions:
        metrics = v.metadata.get("metrics", {})
        acc = metrics.get("accuracy")
        acc_text = f"accuracy {acc:.4f}" if isinstance(acc, (int, float)) else "accuracy ?"
        params = v.metadata.get("params", {})
        param_text = ", ".join(f"{k}={params[k]}" for k in shown if k in params)
        verdict = registry.verdict(v.number)
        state = ",".join(sorted(by_number.get(v.number, []))) or verdict.get("state", "registered")
        reason = verdict.get("reason", "")
        print(f"  {v.number:>3}  {state:<12} {acc_text}  {param_text}" + (f"  ({reason})" if reason else ""))
    return EXIT_OK


def _distinguishing_params(params: list[dict[str, Any]], most: int = 4) -> list[str]:
    """The scalar params whose values differ between versions (what tells them apart), at most ``most``."""
    keys = sorted({k for p in params for k, v in p.items() if isinstance(v, (str, int, float, bool))})
    differing = [k for k in keys if len({repr(p.get(k)) for p in params}) > 1]
    return differing[:most]


def describe_settings(schema: dict[str, Any], prefix: str = "") -> list[str]:
    """One line per setting of ``schema``: ``key (type, default, range or choices): help``."""
    from mlflowctl.config import Setting

    lines = []
    for key, spec in schema.items():
        path = f"{prefix}{key}"
        if isinstance(spec, dict):
            lines += describe_settings(spec, f"{path}.")
        elif isinstance(spec, Setting):
            lines.append(f"{path} ({_describe_setting(spec)}): {spec.help or '(no help)'}")
    return lines


def cmd_config(root: Path, overrides: dict[str, str], args: Any) -> int:
    import json

    from mlflowctl.config import public

    project = _project(root, overrides)
    if getattr(args, "settings", False):
        for line in describe_settings(project.config.schema):
            print(line)
        return EXIT_OK
    print(json.dumps(public(project.config.data, project.config.schema), indent=2, sort_keys=True))
    return EXIT_OK


def cmd_serve(root: Path, overrides: dict[str, str], args: Any) -> int:
    import json

    project = _project(root, overrides)
    target = project.serving
    if args.action == "start":
        for number in sorted(set(v for v in project.models.labels().values() if isinstance(v, int))):
            project.models.servable(number)  # a damaged labelled version: one line, nothing started
        endpoint = target.start()
        if endpoint is not None:
            print(endpoint.predict_url)
    elif args.action == "stop":
        target.stop()
    else:
        from mlflowctl.serving import as_status

        status = as_status(target, target.status())
        if not status.running:
            print(f"{target.name} server: not running (start it with: mlflowctl serve start)")
            return EXIT_OK
        if not status.versions:
            print(f"{target.name} server: running, no version deployed (deploy one with: doit)")
            return EXIT_OK
        print(status.predict_url or target.endpoint().predict_url)
        if status.grpc:
            print(f"  gRPC (TF Serving PredictionService): {status.grpc}")
        for v in status.versions:
            labels = status.labels_of(v.version)
            shown = f"  [{','.join(labels)}]" if labels else ""
            error = f" ({v.error})" if v.error else ""
            print(f"  version {v.version}: {v.state}{shown}{error}")
        if status.error:
            print(f"  error: {status.error}")
        extra = {k: v for k, v in {**status.details, "metrics_url": status.metrics_url}.items() if v}
        if extra:
            print("  " + json.dumps(extra, default=str, sort_keys=True))
    return EXIT_OK


def cmd_rollback(root: Path, overrides: dict[str, str], args: Any) -> int:
    from mlflowctl.promotion import rollback

    project = _project(root, overrides)
    number = rollback(project)
    print(f"model {project.model_name}: version {number} is stable again")
    return EXIT_OK


def cmd_monitor(root: Path, overrides: dict[str, str], args: Any) -> int:
    import time

    from mlflowctl.errors import EXIT_GATE

    pipeline = load_pipeline(root, overrides)
    pipeline.project.backend.preflight()
    out = pipeline.project.state_dir / "monitor" / time.strftime("%Y%m%d-%H%M%S")
    result = pipeline.run_uncached("monitor", out)
    if result.exit_code == EXIT_GATE:
        return EXIT_GATE
    if not result.ok:
        raise MlflowctlError(f"monitor failed with exit code {result.exit_code}", hint=f"log: {result.log_path}")
    print(f"report: {out / 'report.md'}")
    return EXIT_OK


def cmd_render(root: Path, overrides: dict[str, str], args: Any) -> int:
    pipeline = load_pipeline(root, overrides)
    folder = Path(args.out)
    folder = folder if folder.is_absolute() else pipeline.project.root / folder
    for path in pipeline.render(folder):
        print(path)
    for path in pipeline.project.backend.render_setup(folder / "setup"):
        print(path)
    return EXIT_OK


def cmd_export(root: Path, overrides: dict[str, str], args: Any) -> int:
    from mlflowctl_plugins.argo_export import export

    text = export(load_pipeline(root, overrides), args.out, args.stage, args.runner_image)
    if text is not None:
        sys.stdout.write(text)
    return EXIT_OK


def cmd_setup(root: Path, overrides: dict[str, str], args: Any) -> int:
    project = _project(root, overrides)
    applied = project.backend.apply_setup(dry_run=args.dry_run)
    if not applied:
        print(f"backend {project.config['backend']!r} needs no set-up")
    for item in applied:
        print(f"{'validated' if args.dry_run else 'applied'} {item}")
    return EXIT_OK


def cmd_prune(root: Path, overrides: dict[str, str], args: Any) -> int:
    from mlflowctl.errors import ConfigError

    project = _project(root, {"backend": "docker", **overrides})
    backend = project.backend
    if not hasattr(backend, "prune"):
        raise ConfigError(f"backend {project.config['backend']!r} has nothing to prune")
    backend.preflight()
    for name in backend.prune(keep=args.keep) + backend.prune_containers():
        print(f"removed {name}")
    return EXIT_OK


def cmd_plugin(root: Path, overrides: dict[str, str], args: Any) -> int:
    from mlflowctl.scaffold import new_serving_target

    dest = Path(args.dir or f"mlflowctl-{args.name.replace('_', '-')}")
    for path in new_serving_target(args.name, dest):
        print(path)
    print(f"next: cd {dest} && pip install -e '.[test]' && pytest")
    return EXIT_OK


def cmd_ui(root: Path, overrides: dict[str, str], args: Any) -> int:
    from mlflowctl.ui import serve

    return serve(root, overrides, port=args.port)


def cmd_report(root: Path, overrides: dict[str, str], args: Any) -> int:
    import json

    pipeline = load_pipeline(root, overrides)
    project = pipeline.project
    stable = project.models.labels().get("stable")
    if stable is None:
        print(f"model {project.model_name}: no stable version yet (run: doit)")
        return EXIT_OK

    def result(stage: str, name: str) -> dict[str, Any]:
        try:
            return json.loads((pipeline.current_result(stage) / name).read_text())
        except (MlflowctlError, OSError, ValueError):
            return {}

    endpoint = project.serving.endpoint()
    from mlflowctl.promotion import REPORT_INPUT, promote_version

    gate = next((up for stage in pipeline.stages.values() if stage.action is promote_version
                 for env, up in stage.inputs if env == REPORT_INPUT), None)  # the stage whose report promote reads
    test = _tested(project, stable, result(gate, "report.json") if gate else {})
    drift = result("monitor", "drift.json")
    if drift and drift.get("version") != stable:
        drift = {}  # the monitor looked at another version: not this one's drift
    print(f"stable:    {project.model_name} version {stable}")
    print(f"endpoint:  {endpoint.predict_url}")
    if test:
        ood = test.get("ood_rate") or {}
        samples = f" on {test['samples']} held-out images" if test.get("samples") else ""
        print(f"accuracy:  {test.get('accuracy', float('nan')):.4f}{samples} "
              f"(floor {test.get('min_accuracy')}); flagged out-of-distribution: noisy {ood.get('noisy')}, "
              f"random {ood.get('random')}")
    else:
        print(f"accuracy:  not tested (no integration test report of version {stable})")
    if drift:
        note = f" — {drift['note']}" if drift.get("note") else ""
        print(f"drift:     {drift.get('rate', 0):.2f} of {drift.get('scored', 0)} live images out of distribution "
              f"(max {drift.get('max_rate')}){note}; report: {pipeline.current_result('monitor') / 'report.md'}")
    return EXIT_OK


def _tested(project: Any, stable: int, report: dict[str, Any]) -> dict[str, Any]:
    """The integration test figures of version ``stable``, never another version's.

    The gate stage's current report counts only if it tested ``stable``; else the summary
    recorded with the version's promotion verdict (``mlflowctl models``) is used.
    """
    tested = (report.get("endpoint") or {}).get("version") if isinstance(report.get("endpoint"), dict) else None
    if report and tested == stable:
        return report
    recorded = project.models.verdict(stable).get("report")
    return recorded if isinstance(recorded, dict) and "accuracy" in recorded else {}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
