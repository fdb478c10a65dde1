"""``mlflowctl ui``: one read-only local page for the pipeline, the model versions and drift.

The page reads what every other command reads -- the project, its config
overrides, its store (through the :class:`~mlflowctl.stores.Store` API only)
and the state folder's run records -- and polls ``/api/sections`` so it
follows a ``doit`` running in another terminal without reloading.

Security: it listens on 127.0.0.1 only, answers GET and HEAD only (anything
that changes state stays in the CLI), and refuses a request whose ``Host``
header is not this server (``127.0.0.1``, ``localhost`` or ``[::1]`` with its
port), so a web page cannot reach it through DNS rebinding.

Imported only by ``mlflowctl ui`` (Jinja2 is loaded here, never by
``mlflowctl --help``).
"""
from __future__ import annotations

import calendar
import json
import math
import threading
import time
from collections import deque
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, quote, unquote, urlsplit

from mlflowctl import ui_svg
from mlflowctl.errors import MlflowctlError, UnavailableError
from mlflowctl.pipeline import Pipeline, Stage, digest_json
from mlflowctl.state import pid_alive
from mlflowctl.stores import MANIFEST

DEFAULT_PORT = 8765
HOST = "127.0.0.1"
POLL_SECONDS = 1.5            # how often the page asks for changes
STATE_TTL = 0.5               # state gathered at most this often, whatever the number of open pages
LIVE_SAMPLE_SECONDS = 2.0     # live drift samples kept at most this often
LIVE_SAMPLES = 720            # ... and this many (the page's own history of the server's live window)
HTTP_TIMEOUT = 1.0            # for the serving target's drift JSON and metadata
LOG_LIMIT = 2 * 1024 * 1024   # a log page shows at most this much (the end)
REPORT_ROWS = 20              # monitor reports listed under the chart (the chart has them all)
ARTIFACT_TYPES = {".png": "image/png", ".md": "text/plain; charset=utf-8", ".json": "application/json",
                  ".log": "text/plain; charset=utf-8", ".txt": "text/plain; charset=utf-8"}
STATIC_FILES = {"ui.css": "text/css; charset=utf-8", "ui.js": "text/javascript; charset=utf-8"}
PACKAGE_DIR = Path(__file__).resolve().parent

STATE_LABELS = {"fresh": "up to date", "stale": "will run", "running": "running", "failed": "failed",
                "error": "error"}
NOTHING_HAS_RUN = "nothing has run; run `doit`"


# ================================================================ small helpers
def fmt_duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        return ""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{int(seconds // 60)} min {int(seconds % 60)} s"
    return f"{seconds / 3600:.1f} h"


def fmt_time(ts: Any) -> str:
    if not isinstance(ts, (int, float)) or not math.isfinite(ts):
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def parse_when(text: Any) -> float | None:
    """``2026-11-30T01:02:03Z`` (the monitor's ``when``) as epoch seconds."""
    if not isinstance(text, str):
        return None
    try:
        return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")))
    except ValueError:
        return None


def _read_local_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _why(path: str, exc: BaseException) -> str:
    """One line for a file that could not be read."""
    exc = getattr(exc, "cause", None) or exc  # a store's DamagedFile: say what the parser said
    if isinstance(exc, json.JSONDecodeError):
        return f"{path}: not valid JSON ({exc.msg}, line {exc.lineno} column {exc.colno})"
    if isinstance(exc, UnicodeDecodeError):
        return f"{path}: not UTF-8 text"
    if isinstance(exc, OSError):
        return f"{path}: cannot be read ({exc.strerror or exc})"
    return f"{path}: {exc}"


def _num(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _get_json(url: str, timeout: float = HTTP_TIMEOUT) -> Any:
    """GET a JSON document on loopback with the stdlib (None on any failure)."""
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.loads(response.read())
    except (OSError, ValueError):
        return None


def curl_command(predict_url: str, width: int | None) -> str:
    """A copyable ``curl`` that asks ``predict_url`` for one all-zeros instance of ``width`` floats."""
    n = width if isinstance(width, int) and width > 0 else 784
    make = f"import json; print(json.dumps({{\"instances\": [[0.0] * {n}]}}))"
    return f"python3 -c '{make}' | curl -s -H 'Content-Type: application/json' -d @- {predict_url}"


def input_width(metadata: Any) -> int | None:
    """Number of floats per instance from TF Serving's metadata JSON (its first input), if it says."""
    try:
        sigs = metadata["metadata"]["signature_def"]["signature_def"]
        sig = sigs.get("serving_default") or next(iter(sigs.values()))
        spec = next(iter(sig["inputs"].values()))
        dims = [int(d["size"]) for d in spec["tensor_shape"]["dim"]][1:]
    except (KeyError, TypeError, ValueError, StopIteration, AttributeError):
        return None
    if not dims or any(d <= 0 for d in dims):
        return None
    return math.prod(dims)


# ================================================================ the state the page shows
class Dashboard:
    """Gathers what the page shows from one project (config + overrides), its store and state folder.

    ``state()`` is what ``/api/state`` returns; it is rebuilt at most every
    ``STATE_TTL`` seconds. Published results and model versions never change
    once in the store, so their JSON is read once and kept.
    """

    def __init__(self, root: Path, overrides: dict[str, str],
                 loader: Callable[[Path, dict[str, str]], Pipeline] | None = None) -> None:
        if loader is None:
            from mlflowctl.cli import load_pipeline as loader
        pipeline = loader(root, overrides)
        self.project = pipeline.project
        self.root = self.project.root
        self.overrides = dict(overrides)
        self.stages: list[Stage] = list(pipeline.stages.values())
        self.config_error: str | None = None
        self._config_stamp = self._stamp()
        self._immutable: dict[str, Any] = {}
        self._local_reports: dict[str, tuple[tuple[int, int], Any]] = {}
        self._width: dict[tuple[str, int], int | None] = {}
        self.live: deque[dict[str, Any]] = deque(maxlen=LIVE_SAMPLES)
        self._lock = threading.Lock()
        self._cache: tuple[float, Any, dict[str, Any]] | None = None

    # -- config: re-read when mlflowctl.yaml changes --------------------------
    def _stamp(self) -> tuple[int, int] | None:
        from mlflowctl.config import CONFIG_FILE

        try:
            st = (self.root / CONFIG_FILE).stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def _refresh_project(self) -> None:
        stamp = self._stamp()
        if stamp == self._config_stamp:
            return
        from mlflowctl.project import Project

        self._config_stamp = stamp
        try:
            self.project = Project(self.root, self.overrides, stages=self.stages)
            self.config_error = None
            self._immutable.clear()  # the store may be another one now
        except MlflowctlError as exc:  # keep showing the last good config, say what is wrong
            self.config_error = f"{exc} — showing the last valid configuration"

    # -- store reads -------------------------------------------------------------
    @property
    def store(self) -> Any:
        return self.project.store

    def immutable_json(self, path: str) -> Any:
        """JSON of a published (never rewritten) store file, read once; None when it is missing."""
        if path in self._immutable:
            return self._immutable[path]
        data = self.store.read_json(path)  # raises ValueError when corrupt: not cached, so a fix shows
        if data is not None:
            self._immutable[path] = data
        return data

    # -- the whole state -----------------------------------------------------------
    def state(self, version: int | None = None) -> dict[str, Any]:
        with self._lock:
            now = time.monotonic()
            if self._cache and now - self._cache[0] < STATE_TTL and self._cache[1] == version:
                return self._cache[2]
            state = self._build(version)
            self._cache = (now, version, state)
            return state

    def _section(self, build: Callable[[], Any], fallback: Any) -> tuple[Any, str | None]:
        """Run one section's builder; an unexpected failure becomes that section's error, not the page's."""
        try:
            return build(), None
        except MlflowctlError as exc:
            return fallback, str(exc)
        except Exception as exc:  # noqa: BLE001 - the page shows it and keeps working
            return fallback, f"{type(exc).__name__}: {exc}"

    def _build(self, version: int | None) -> dict[str, Any]:
        self._refresh_project()
        project = self.project
        pipeline = Pipeline(project, self.stages)  # a fresh one: result digests change under a running doit
        stages, stages_error = self._section(lambda: [self.stage_view(pipeline, s) for s in self.ordered()], [])
        serving, serving_error = self._section(self.serving_view, {"running": False})
        versions, versions_error = self._section(lambda: self.versions_view(serving), {"rows": [], "labels": {}})
        drift, drift_error = self._section(lambda: self.drift_view(versions, serving, version),
                                           {"points": [], "live": [], "reports": [], "histogram": None})
        # a shared store may hold results this machine never ran: those count too
        ran = any(s.get("has_run") or s.get("state") != "stale" for s in stages) or bool(versions.get("rows"))
        state = {
            "project": project.name, "model": project.model_name, "store": str(project.store.url),
            "backend": project.config["backend"], "serving_target": project.config["serving"]["target"],
            "overrides": self.overrides, "config_error": self.config_error,
            "nothing_has_run": not ran,
            "pipeline": {"stages": stages, "edges": [[up, s.name] for s in self.stages for up in s.upstream],
                         "error": stages_error},
            "versions": {**versions, "error": versions_error},
            "serving": {**serving, "error": serving_error},
            "drift": {**drift, "error": drift_error},
        }
        state["digest"] = digest_json(state)[:16]
        state["generated_at"] = time.time()
        return state

    # -- pipeline ----------------------------------------------------------------------
    def ordered(self) -> list[Stage]:
        """The stages in the graph's order: by column (longest path from a first stage), then name."""
        depth = ui_svg.layers([s.name for s in self.stages], [(u, s.name) for s in self.stages for u in s.upstream])
        return sorted(self.stages, key=lambda s: (depth[s.name], s.name))

    def stage_view(self, pipeline: Pipeline, stage: Stage) -> dict[str, Any]:
        """One stage: state, reasons, key, last duration, runs in the store, where its log is."""
        view: dict[str, Any] = {"name": stage.name, "doc": stage.doc, "upstream": stage.upstream,
                                "kind": "command" if stage.command else "action", "reasons": [], "key": None,
                                "error": None, "duration": None, "finished_at": None, "runs": 0,
                                "log": f"/log/{quote(stage.name)}", "has_run": False}
        last = _read_local_json(pipeline.last_run_path(stage.name)) or {}
        run = _read_local_json(pipeline.run_state_path(stage.name)) or {}
        view["has_run"] = bool(last or run)
        try:
            info = pipeline.resolve(stage)
            fresh, reasons = pipeline.explain(stage)
        except MlflowctlError as exc:
            view.update(state="error", label=STATE_LABELS["error"], error=str(exc))
            return view
        view.update(key=info.key, reasons=reasons, state="fresh" if fresh else "stale")
        manifest = None
        for key in dict.fromkeys(k for k in (info.key if fresh else None, last.get("key")) if k):
            try:
                manifest = self.immutable_json(f"results/{stage.name}/{key}/{MANIFEST}")
            except (ValueError, OSError) as exc:
                view["error"] = _why(f"results/{stage.name}/{key}/{MANIFEST}", exc)
            if manifest:
                view["result_key"] = key
                break
        if manifest:
            view.update(duration=_num(manifest.get("duration")), finished_at=_num(manifest.get("finished_at")))
        if run.get("state") == "running" and pid_alive(run.get("pid")):
            started = _num(run.get("started_at"))
            view.update(state="running", reasons=[f"running since {fmt_time(started)}"] if started else [],
                        duration=(time.time() - started) if started else None, running_key=run.get("key"))
        elif run.get("state") == "failed" and not fresh and run.get("key") == info.key:
            view.update(state="failed", error=run.get("error") or "failed",
                        duration=_num(run.get("duration")), finished_at=_num(run.get("finished_at")))
        elif run.get("state") == "running" and not fresh:
            view["reasons"] = view["reasons"] + ["its last run was interrupted"]
        try:
            view["runs"] = len(self.store.list(f"results/{stage.name}"))
        except OSError:
            pass
        view["label"] = STATE_LABELS[view["state"]]
        view["duration_text"] = fmt_duration(view["duration"])
        return view

    def stage_log(self, name: str) -> tuple[str, str]:
        """(where it comes from, the text) of a stage's log: the live/failed run's, else the stored result's."""
        pipeline = Pipeline(self.project, self.stages)
        stage = next((s for s in self.stages if s.name == name), None)
        if stage is None:
            raise KeyError(name)
        local = self.project.state_dir / "logs" / f"{name}.log"
        run = _read_local_json(pipeline.run_state_path(name)) or {}
        last = _read_local_json(pipeline.last_run_path(name)) or {}
        try:
            current = pipeline.resolve(stage).key
        except MlflowctlError:
            current = None
        live = run.get("state") == "running" and pid_alive(run.get("pid"))
        failed_now = run.get("state") == "failed" and run.get("key") == current
        if (live or failed_now) and local.is_file():
            return str(local), _tail_text(local.read_bytes())
        keys = [current, last.get("key")]
        for key in dict.fromkeys(k for k in keys if k):
            path = f"results/{name}/{key}/_logs/{name}.log"
            if self.store.exists(path):
                with self.store.open(path, "rb") as fh:
                    return f"{self.store.url} {path}", _tail_text(fh.read())
        if local.is_file():
            return str(local), _tail_text(local.read_bytes())
        return "", f"stage {name} has no log yet (run: doit {name})"

    # -- serving -------------------------------------------------------------------------
    def serving_view(self) -> dict[str, Any]:
        target = self.project.serving
        status = target.status()
        out = {k: status.get(k) for k in ("running", "url", "predict_url", "metrics_url", "labels", "versions",
                                          "runtime", "error")}
        out["target"] = target.name
        out["running"] = bool(status.get("running"))
        if out["running"] and not out.get("metrics_url"):
            out["metrics_url"] = target.metrics_url()
        return out

    # -- versions ------------------------------------------------------------------------
    def versions_view(self, serving: dict[str, Any]) -> dict[str, Any]:
        registry = self.project.models
        errors = []
        try:
            labels = registry.labels()
            if not isinstance(labels, dict):
                raise ValueError("expected a JSON object")
        except (ValueError, OSError) as exc:
            labels = {}
            errors.append(_why(f"{registry.base}/labels.json", exc))
        rows = []
        for number in reversed(registry.numbers()):
            rows.append(self.version_row(registry, number, labels, serving))
        return {"rows": rows, "labels": labels, "model": registry.name, "labels_error": "; ".join(errors) or None}

    def version_row(self, registry: Any, number: int, labels: dict[str, Any], serving: dict[str, Any]) -> dict:
        base = f"{registry.base}/{number}"
        row: dict[str, Any] = {"number": number, "labels": sorted(k for k, v in labels.items() if v == number),
                               "errors": [], "metrics": {}, "params": {}, "state": "registered", "reason": "",
                               "accuracy": None, "floor": None, "ood": {}, "latency": None, "registered_at": None,
                               "endpoint": None, "curl": None}
        meta: Any = {}
        try:
            meta = self.immutable_json(f"{base}/metadata.json") or {}
            if not isinstance(meta, dict):
                raise ValueError("expected a JSON object")
        except (ValueError, OSError) as exc:
            row["errors"].append(_why(f"{base}/metadata.json", exc))
            meta = {}
        verdict: Any = {}
        try:
            verdict = self.store.read_json(f"{registry.base}/status/{number}.json") or {}
            if not isinstance(verdict, dict):
                raise ValueError("expected a JSON object")
        except (ValueError, OSError) as exc:
            row["errors"].append(_why(f"{registry.base}/status/{number}.json", exc))
            verdict = {}
        report = verdict.get("report") if isinstance(verdict.get("report"), dict) else {}
        metrics = meta.get("metrics") if isinstance(meta.get("metrics"), dict) else {}
        params = meta.get("params") if isinstance(meta.get("params"), dict) else {}
        row.update(
            metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float, str))},
            params={k: v for k, v in params.items() if isinstance(v, (int, float, str, bool))},
            state=str(verdict.get("state") or ("canary" if "canary" in row["labels"] else "registered")),
            reason=str(verdict.get("reason") or ""), verdict_at=_num(verdict.get("time")),
            accuracy=_num(report.get("accuracy")), floor=_num(report.get("min_accuracy")),
            ood={k: _num(v) for k, v in (report.get("ood_rate") or {}).items()}
            if isinstance(report.get("ood_rate"), dict) else {},
            latency=report.get("latency_ms") if isinstance(report.get("latency_ms"), dict) else None,
            registered_at=_num(meta.get("registered_at")),
        )
        row["passed"] = None if row["accuracy"] is None or row["floor"] is None else row["accuracy"] >= row["floor"]
        if "stable" in row["labels"] and serving.get("running"):
            url = serving.get("predict_url") or ""
            if url:
                row["endpoint"] = url
                row["curl"] = curl_command(url, self.input_width(serving, number))
        return row

    def input_width(self, serving: dict[str, Any], number: int) -> int | None:
        base = serving.get("url") or ""
        key = (base, number)
        if key not in self._width:
            meta = _get_json(f"{base}/v1/models/{quote(self.project.model_name, safe='')}/versions/{number}/metadata")
            width = input_width(meta)
            if width is None:
                return None  # ask again next time (the version may still be loading)
            self._width[key] = width
        return self._width[key]

    # -- drift ---------------------------------------------------------------------------
    def drift_view(self, versions: dict[str, Any], serving: dict[str, Any], version: int | None) -> dict[str, Any]:
        reports = self.stage_reports() + self.on_demand_reports()
        reports.sort(key=lambda r: r.get("time") or 0, reverse=True)
        max_rate = None
        try:
            max_rate = _num(self.project.config["monitor"]["max_drift_rate"])
        except (KeyError, TypeError):
            pass
        if max_rate is None:
            max_rate = next((r["max_rate"] for r in reports if r.get("max_rate") is not None), None)
        numbers = [r["number"] for r in versions.get("rows", [])]
        stable = versions.get("labels", {}).get("stable")
        chosen = version if version in numbers else (stable if stable in numbers else (numbers[0] if numbers else None))
        live_now = self.live_sample(serving)
        return {"max_rate": max_rate, "points": [r for r in reports if r.get("rate") is not None],
                "reports": reports[:REPORT_ROWS], "report_count": len(reports), "live": list(self.live),
                "live_now": live_now, "metrics_url": serving.get("metrics_url") if serving.get("running") else None,
                "versions": numbers, "chosen": chosen,
                "histogram": self.histogram(chosen, serving) if chosen is not None else None}

    def stage_reports(self) -> list[dict[str, Any]]:
        """Drift reports of the pipeline's monitor stage, one per published result in the store."""
        out = []
        for key in self.store.list("results/monitor"):
            path = f"results/monitor/{key}/drift.json"
            row: dict[str, Any] = {"source": "stage", "key": key, "path": path,
                                   "plot": f"/artifact/results/monitor/{quote(key)}/drift.png",
                                   "report": f"/artifact/results/monitor/{quote(key)}/report.md"}
            try:
                data = self.immutable_json(path)
                if data is None:
                    continue
                if not isinstance(data, dict):
                    raise ValueError("expected a JSON object")
            except (ValueError, OSError) as exc:
                row["error"] = _why(path, exc)
                manifest = self._manifest_quiet(f"results/monitor/{key}")
                row["time"] = _num(manifest.get("finished_at"))
                out.append(row)
                continue
            out.append({**row, **_report_fields(data)})
            if row.get("time") is None and out[-1].get("time") is None:
                out[-1]["time"] = _num(self._manifest_quiet(f"results/monitor/{key}").get("finished_at"))
        return out

    def _manifest_quiet(self, path: str) -> dict[str, Any]:
        try:
            data = self.immutable_json(f"{path}/{MANIFEST}")
        except (ValueError, OSError):
            return {}
        return data if isinstance(data, dict) else {}

    def on_demand_reports(self) -> list[dict[str, Any]]:
        """Reports of ``mlflowctl monitor`` (kept in the state folder, ``monitor/<time>/``)."""
        folder = self.project.state_dir / "monitor"
        out = []
        try:
            entries = sorted(p for p in folder.iterdir() if p.is_dir())
        except OSError:
            return out
        for entry in entries:
            path = entry / "drift.json"
            row: dict[str, Any] = {"source": "on-demand", "key": entry.name, "path": str(path),
                                   "plot": f"/on-demand/{quote(entry.name)}/drift.png",
                                   "report": f"/on-demand/{quote(entry.name)}/report.md"}
            try:
                st = path.stat()
            except OSError:
                continue  # still being written, or the run failed before its report
            stamp = (st.st_mtime_ns, st.st_size)
            cached = self._local_reports.get(str(path))
            if cached and cached[0] == stamp:
                out.append(cached[1])
                continue
            try:
                data = json.loads(path.read_text())
                if not isinstance(data, dict):
                    raise ValueError("expected a JSON object")
                row.update(_report_fields(data))
            except (ValueError, OSError) as exc:
                row.update(error=_why(str(path), exc), time=st.st_mtime)
            self._local_reports[str(path)] = (stamp, row)
            out.append(row)
        return out

    def live_drift(self, serving: dict[str, Any], query: str) -> dict[str, Any] | None:
        """The serving target's live drift JSON (the embedded server's ``/monitor/v1/models/<m>/drift``)."""
        if not serving.get("running") or not serving.get("url"):
            return None
        data = _get_json(f"{serving['url']}/monitor/v1/models/{quote(self.project.model_name, safe='')}/drift?{query}")
        return data if isinstance(data, dict) else None

    def live_sample(self, serving: dict[str, Any]) -> dict[str, Any] | None:
        """The stable version's live window now; kept as a sample of the page's live history."""
        data = self.live_drift(serving, "label=stable")
        if data is None:
            return None
        window = data.get("window") if isinstance(data.get("window"), dict) else {}
        size, outliers = window.get("size"), window.get("outliers")
        sample = {"time": time.time(), "version": data.get("version"), "scored": data.get("scored"),
                  "outliers": data.get("outliers"), "window": size, "window_outliers": outliers,
                  "rate": (outliers / size) if isinstance(size, int) and size > 0 and isinstance(outliers, int)
                  else None}
        if sample["rate"] is not None and (not self.live or sample["time"] - self.live[-1]["time"] >= LIVE_SAMPLE_SECONDS):
            self.live.append({"time": sample["time"], "rate": sample["rate"], "version": sample["version"]})
        return sample

    def histogram(self, number: int, serving: dict[str, Any]) -> dict[str, Any]:
        """Training errors (from the version's ``concept/threshold.json`` in the store) vs live ones (the server)."""
        path = f"{self.project.models.base}/{number}/concept/threshold.json"
        out: dict[str, Any] = {"version": number, "edges": None, "train": None, "live": None, "live_extra": 0,
                               "threshold": None, "error": None, "live_note": None}
        try:
            info = self.immutable_json(path) or {}
            hist = info.get("histogram") or {}
            out.update(edges=hist.get("edges"), train=hist.get("counts"), threshold=_num(info.get("threshold")))
        except (ValueError, OSError, AttributeError) as exc:
            out["error"] = _why(path, exc)
        data = self.live_drift(serving, f"version={number}")
        if data is None:
            out["live_note"] = "the model server is not running" if not serving.get("running") else \
                "the serving target gives no live histogram"
        else:
            live = data.get("live_histogram") if isinstance(data.get("live_histogram"), dict) else None
            if live and live.get("counts") and sum(live["counts"]) + (live.get("underflow") or 0) + \
                    (live.get("overflow") or 0) > 0:
                out["live"] = live["counts"]
                out["live_extra"] = int((live.get("underflow") or 0) + (live.get("overflow") or 0))
            else:
                out["live_note"] = "no live traffic on this version yet"
            if out["threshold"] is None:
                out["threshold"] = _num(data.get("threshold"))
        return out


def _report_fields(data: dict[str, Any]) -> dict[str, Any]:
    window = data.get("window") if isinstance(data.get("window"), dict) else {}
    return {"time": parse_when(data.get("when")), "rate": _num(data.get("rate")), "max_rate": _num(data.get("max_rate")),
            "passed": data.get("passed"), "version": data.get("version"), "scored": data.get("scored"),
            "window": window.get("size"), "note": data.get("note")}


def _tail_text(data: bytes) -> str:
    if len(data) > LOG_LIMIT:
        data = b"[... earlier output cut ...]\n" + data[-LOG_LIMIT:]
    return data.decode("utf-8", errors="replace")


# ================================================================ HTML
class Renderer:
    """The page and its sections, from a state, with Jinja2 templates (``mlflowctl/templates/ui/``)."""

    SECTIONS = ("pipeline", "versions", "drift")

    def __init__(self) -> None:
        import jinja2

        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(PACKAGE_DIR / "templates" / "ui")),
            autoescape=True, trim_blocks=True, lstrip_blocks=True)
        self.env.filters.update(duration=fmt_duration, when=fmt_time, pct=_pct, num=_fmt_value)
        self.env.globals.update(graph=self._graph, drift_chart=self._drift_chart, histogram=self._histogram,
                                poll_seconds=POLL_SECONDS, NOTHING_HAS_RUN=NOTHING_HAS_RUN)
        from markupsafe import Markup

        self._markup = Markup

    def _graph(self, state: dict[str, Any]) -> Any:
        p = state["pipeline"]
        return self._markup(ui_svg.pipeline_graph(p["stages"], [tuple(e) for e in p["edges"]]))

    def _drift_chart(self, state: dict[str, Any]) -> Any:
        d = state["drift"]
        return self._markup(ui_svg.drift_chart(d.get("points", []), d.get("max_rate"), d.get("live", [])))

    def _histogram(self, state: dict[str, Any]) -> Any:
        h = state["drift"].get("histogram") or {}
        return self._markup(ui_svg.histogram(h.get("edges"), h.get("train"), h.get("live"), h.get("threshold"),
                                             live_extra=h.get("live_extra") or 0))

    def section(self, name: str, state: dict[str, Any]) -> str:
        return self.env.get_template(f"{name}.html").render(s=state)

    def sections(self, state: dict[str, Any]) -> dict[str, str]:
        return {name: self.section(name, state) for name in self.SECTIONS + ("header",)}

    def page(self, state: dict[str, Any]) -> str:
        return self.env.get_template("page.html").render(s=state, sections=self.sections(state))


def _pct(value: Any, digits: int = 1) -> str:
    v = _num(value)
    return "" if v is None else f"{v * 100:.{digits}f} %"


def _fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# ================================================================ HTTP
class UiServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, dashboard: Dashboard, renderer: Renderer) -> None:
        self.dashboard = dashboard
        self.renderer = renderer
        super().__init__((HOST, port), Handler)
        self.port = self.server_address[1]
        self.allowed_hosts = {f"127.0.0.1:{self.port}", f"localhost:{self.port}", f"[::1]:{self.port}"}

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/"

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A browser that drops a connection (reset, broken pipe) is normal; anything else is one line."""
        import sys

        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, TimeoutError)):
            return
        print(f"mlflowctl ui: error answering {client_address[0]}: {type(exc).__name__}: {exc}", file=sys.stderr)


CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


class Handler(BaseHTTPRequestHandler):
    server: UiServer
    server_version = "mlflowctl-ui"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the terminal shows the URL only
        pass

    # -- methods: read only --------------------------------------------------------------
    def do_GET(self) -> None:
        self._handle(head=False)

    def do_HEAD(self) -> None:
        self._handle(head=True)

    def _refuse(self) -> None:
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"mlflowctl ui is read only: GET and HEAD only\n",
                   "text/plain; charset=utf-8", extra={"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _refuse

    # -- plumbing -----------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, ctype: str, head: bool = False,
              extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy", CSP)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _text(self, status: int, text: str, head: bool = False) -> None:
        self._send(status, text.encode(), "text/plain; charset=utf-8", head)

    def _json(self, data: Any, head: bool = False) -> None:
        self._send(HTTPStatus.OK, json.dumps(data, default=str).encode(), "application/json", head)

    def _handle(self, head: bool) -> None:
        try:
            host = (self.headers.get("Host") or "").strip().lower()
            if host not in self.server.allowed_hosts:
                self._text(HTTPStatus.FORBIDDEN, f"forbidden: Host {host!r} is not this server "
                                                 f"(open {self.server.url})\n", head)
                return
            self._route(head)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:  # noqa: BLE001 - one line in the answer, the server keeps serving
            import sys

            message = f"mlflowctl ui: {self.path}: {type(exc).__name__}: {exc}"
            print(message, file=sys.stderr, flush=True)
            self._text(HTTPStatus.INTERNAL_SERVER_ERROR, message + "\n", head)

    def _route(self, head: bool) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        path = url.path
        dash, render = self.server.dashboard, self.server.renderer
        version = _int(query.get("version", [None])[0])
        if path == "/":
            body = render.page(dash.state(version)).encode()
            self._send(HTTPStatus.OK, body, "text/html; charset=utf-8", head)
        elif path == "/api/state":
            self._json(dash.state(version), head)
        elif path == "/api/sections":
            state = dash.state(version)
            if query.get("since", [""])[0] == state["digest"]:
                self._send(HTTPStatus.OK, json.dumps({"digest": state["digest"], "changed": False}).encode(),
                           "application/json", head)
                return
            self._json({"digest": state["digest"], "changed": True, "sections": render.sections(state)}, head)
        elif path.startswith("/log/"):
            name = unquote(path[len("/log/"):])
            try:
                source, text = dash.stage_log(name)
            except KeyError:
                self._text(HTTPStatus.NOT_FOUND, f"no stage {name!r}\n", head)
                return
            self._text(HTTPStatus.OK, (f"# {source}\n" if source else "") + text, head)
        elif path.startswith("/artifact/"):
            self._artifact(unquote(path[len("/artifact/"):]), head)
        elif path.startswith("/on-demand/"):
            self._on_demand(unquote(path[len("/on-demand/"):]), head)
        elif path.startswith("/static/") and path[len("/static/"):] in STATIC_FILES:
            name = path[len("/static/"):]
            self._send(HTTPStatus.OK, (PACKAGE_DIR / "static" / name).read_bytes(), STATIC_FILES[name], head)
        else:
            self._text(HTTPStatus.NOT_FOUND, f"not found: {path}\n", head)

    def _artifact(self, rel: str, head: bool) -> None:
        """A small file of a published stage result (``results/<stage>/<key>/<file>``), through the store."""
        parts = rel.split("/")
        ctype = ARTIFACT_TYPES.get(Path(rel).suffix)
        store = self.server.dashboard.store
        if len(parts) != 4 or parts[0] != "results" or ctype is None or any(p in ("", ".", "..") for p in parts) \
                or not store.exists(rel):
            self._text(HTTPStatus.NOT_FOUND, f"no artifact {rel}\n", head)
            return
        with store.open(rel, "rb") as fh:
            self._send(HTTPStatus.OK, fh.read(), ctype, head)

    def _on_demand(self, rel: str, head: bool) -> None:
        parts = rel.split("/")
        ctype = ARTIFACT_TYPES.get(Path(rel).suffix)
        folder = self.server.dashboard.project.state_dir / "monitor"
        if len(parts) != 2 or ctype is None or any(p in ("", ".", "..") or p.startswith(".") for p in parts) \
                or not (folder / parts[0] / parts[1]).is_file():
            self._text(HTTPStatus.NOT_FOUND, f"no report file {rel}\n", head)
            return
        self._send(HTTPStatus.OK, (folder / parts[0] / parts[1]).read_bytes(), ctype, head)


def _int(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


# ================================================================ entry point
def serve(root: Path, overrides: dict[str, str], port: int = DEFAULT_PORT,
          announce: Callable[[str], None] | None = None) -> int:
    """Serve the page until Ctrl-C; exit 5 when the port is taken."""
    import errno
    import sys

    from mlflowctl.errors import ConfigError

    if not 0 <= port <= 65535:
        raise ConfigError(f"ui: --port {port}: expected 0..65535 (0: any free port)")
    dashboard = Dashboard(root, overrides)
    renderer = Renderer()
    try:
        server = UiServer(port, dashboard, renderer)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise UnavailableError(f"ui: port {port} on {HOST} is already in use",
                                   hint="pick another with mlflowctl ui --port N (0: any free port)") from None
        raise UnavailableError(f"ui: cannot listen on {HOST}:{port}: {exc.strerror or exc}",
                               hint="pick another with mlflowctl ui --port N") from None
    import signal

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    say = announce or (lambda text: print(text, flush=True))
    try:  # from here on, Ctrl-C is a clean stop
        if threading.current_thread() is threading.main_thread():
            # Ctrl-C even when started in the background of a script (SIGINT ignored there), and SIGTERM alike
            signal.signal(signal.SIGINT, stop)
            signal.signal(signal.SIGTERM, stop)
        say(f"mlflowctl ui: {server.url}  (project {dashboard.project.name}, store {dashboard.store.url}; "
            "Ctrl-C stops it)")
        server.serve_forever(poll_interval=0.25)
    except KeyboardInterrupt:
        print("mlflowctl ui: stopped", file=sys.stderr, flush=True)
    finally:
        server.server_close()
    return 0
