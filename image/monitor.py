"""Stage ``monitor``: how much of the stable version's live traffic looks out-of-distribution.

Env: ENDPOINT_DIR (input: promote's result, endpoint.json of the stable version and that version's own
concept model in ``concept/``, as the registry holds it), OUTPUT_DIR (output), MAX_DRIFT_RATE (0.5, in
[0, 1]), TIMEOUT (10, seconds per request), CONCEPT_DIR (optional, for a run by hand: the concept model,
``saved_model/`` + ``threshold.json``, where ENDPOINT_DIR has no ``concept/``).

The serving target says how drift is had (``mlflowctl.serving``; endpoint.json's fields):

1. ``drift_url`` -- the target scores drift: ``GET {drift_url}?label=stable`` (``?version={version}``
   if the label is unknown) answers the drift JSON. The drift rate is the share of the recent-window
   live images whose reconstruction error is above the concept model's threshold (test-tagged
   traffic is not in the live statistics); 0 when there is no live traffic yet.
2. ``inputs_url`` -- the target keeps live inputs: ``GET {inputs_url}`` answers ``{"inputs": [...]}``
   and this script scores them with the stable version's concept model itself.
3. neither -- "drift not available for target X": reported (rate 0, ``available: false``), exit 0.

Outputs in OUTPUT_DIR: drift.json, report.md, drift.png (training vs live reconstruction-error
distributions and the threshold).

Exit 0 if the rate is <= MAX_DRIFT_RATE; 6 (``monitor: drift rate 0.62 > max 0.50 on mnist
version 3`` on stderr) if above; 5 when the endpoint is unreachable or misbehaves.
"""
from __future__ import annotations

import math
import os
import sys
import time
from typing import Any

from common import StageError, env_dir, env_float, log, main, make_dir, write_json_atomic, write_text_atomic
from endpoint_client import EXIT_ENDPOINT, HttpClient, drift_url, load_endpoint, snippet, target_name

STAGE = "monitor"
EXIT_DRIFT = 6
NO_TRAFFIC = "no live traffic yet"


def settings() -> dict:
    return {
        "endpoint_dir": env_dir("ENDPOINT_DIR"),
        "output_dir": env_dir("OUTPUT_DIR", must_exist=False),
        "max_rate": env_float("MAX_DRIFT_RATE", 0.5, low=0.0, high=1.0, inclusive=True),
        "timeout": env_float("TIMEOUT", 10.0, low=0.0),
        "concept_dir": concept_dir(),
    }


def concept_dir() -> str:
    """The stable version's own concept model (``ENDPOINT_DIR/concept``), else CONCEPT_DIR, else ""."""
    registered = os.path.join(os.environ.get("ENDPOINT_DIR", "").strip(), "concept")
    if os.environ.get("ENDPOINT_DIR", "").strip() and os.path.isdir(registered):
        return registered
    return os.environ.get("CONCEPT_DIR", "").strip()


# ------------------------------------------------------------------- fetch
def fetch(client: HttpClient, endpoint: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The drift JSON of the stable label (or of the endpoint's version) and the query used."""
    url = drift_url(endpoint)
    answer = client.get(url, {"label": "stable"}, ok_only=False)
    query = "label=stable"
    if answer.status == 404:
        query = f"version={endpoint['version']}"
        answer = client.get(url, {"version": str(endpoint["version"])}, ok_only=False)
    if answer.status != 200:
        raise StageError(f"GET {url}?{query} answered {answer.status}: {snippet(answer.text)}", EXIT_ENDPOINT)
    if answer.json is None:
        raise StageError(f"GET {url}?{query} answered 200 with a body that is not JSON: {snippet(answer.text)}",
                         EXIT_ENDPOINT)
    if not isinstance(answer.json, dict):
        raise StageError(f"GET {url}?{query} answered {type(answer.json).__name__}, expected a JSON object",
                         EXIT_ENDPOINT)
    return answer.json, f"{url}?{query}"


MAX_INPUTS = 10_000  # rows of live inputs scored at most


def fetch_inputs(client: HttpClient, endpoint: dict[str, Any]):
    """The target's live inputs (float32 n×d) from ``inputs_url``; a malformed answer is one line."""
    import numpy as np

    url = endpoint["inputs_url"]
    answer = client.get(url)
    rows = answer.json.get("inputs") if isinstance(answer.json, dict) else None
    if not isinstance(rows, list):
        raise StageError(f"GET {url} answered no 'inputs' list: {snippet(answer.text)}", EXIT_ENDPOINT)
    rows = rows[-MAX_INPUTS:]
    if not rows:
        return np.zeros((0, 0), dtype=np.float32), url
    try:
        arr = np.asarray(rows, dtype=np.float32)
    except (TypeError, ValueError):
        raise StageError(f"GET {url}: 'inputs' is not a list of equally long number rows", EXIT_ENDPOINT) from None
    if arr.ndim != 2:
        raise StageError(f"GET {url}: 'inputs' has shape {'×'.join(map(str, arr.shape))}, expected rows",
                         EXIT_ENDPOINT)
    return arr, url


def score_inputs(concept_dir: str, inputs, endpoint: dict[str, Any], source: str) -> dict[str, Any]:
    """The drift JSON (the shape a scoring target answers) for ``inputs``, scored with the concept model."""
    import json

    import numpy as np

    model_dir = os.path.join(concept_dir, "saved_model")  # train_concept's layout; the registry's has it at the top
    if not os.path.isdir(model_dir):
        model_dir = concept_dir
    try:
        with open(os.path.join(concept_dir, "threshold.json")) as fh:
            info = json.load(fh)
        threshold = float(info["threshold"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StageError(f"CONCEPT_DIR {concept_dir}: no usable threshold.json ({exc})", 2) from None
    if not math.isfinite(threshold):
        raise StageError(f"CONCEPT_DIR {concept_dir}: threshold is not finite", 2)
    errors = np.zeros((0,), dtype=np.float64)
    if len(inputs):
        # TensorFlow's start-up chatter (oneDNN, CPU features) would break the stage's one-line stderr
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
        import tensorflow as tf

        try:
            fn = tf.saved_model.load(model_dir).signatures["serving_default"]
        except (OSError, KeyError, ValueError) as exc:
            raise StageError(f"CONCEPT_DIR {concept_dir}: cannot load the concept model ({type(exc).__name__})",
                             2) from None
        (name, spec), = fn.structured_input_signature[1].items()
        out = []
        for start in range(0, len(inputs), 1000):
            result = fn(**{name: tf.constant(inputs[start:start + 1000], dtype=spec.dtype)})
            out.append(np.asarray(next(iter(result.values())), dtype=np.float64).ravel())
        errors = np.concatenate(out)
    outliers = int(len(errors) - np.count_nonzero(errors <= threshold))  # NaN counts as an outlier
    hist = info.get("histogram") if isinstance(info.get("histogram"), dict) else None
    return {"model_name": endpoint["model_name"], "version": endpoint["version"], "drift_scoring": True,
            "scored": int(len(errors)), "outliers": outliers,
            "window": {"size": int(len(errors)), "outliers": outliers, "capacity": MAX_INPUTS},
            "threshold": threshold, "quantile": info.get("quantile"), "training_histogram": hist,
            "recent_errors": [float(e) for e in errors], "source": source}


def not_available(endpoint: dict[str, Any], max_rate: float) -> dict[str, Any]:
    """drift.json when the target neither scores drift nor gives live inputs: reported, not a failure."""
    return {"rate": 0.0, "max_rate": max_rate, "passed": True, "available": False,
            "note": f"drift not available for target {target_name(endpoint)}",
            "model_name": endpoint["model_name"], "version": endpoint["version"],
            "endpoint_version": endpoint["version"], "drift_scoring": False, "scored": 0, "outliers": 0,
            "window": {"size": 0, "outliers": 0, "capacity": 0}, "threshold": None, "quantile": None,
            "test": None, "source": None, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _int(value: Any, default: int = 0) -> int:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def _num(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def summarize(d: dict[str, Any], endpoint: dict[str, Any], max_rate: float, source: str) -> dict[str, Any]:
    """drift.json: the rate and the numbers behind it."""
    version = d.get("version")
    window = d.get("window") if isinstance(d.get("window"), dict) else {}
    size, outliers = _int(window.get("size")), _int(window.get("outliers"))
    note = None
    if d.get("drift_scoring") is False:
        rate, note = 0.0, "drift scoring is off for this version (no concept model)"
    elif size > 0:
        rate = outliers / size
    else:
        rate, note = 0.0, NO_TRAFFIC
    return {
        "rate": rate,
        "max_rate": max_rate,
        "passed": rate <= max_rate,
        "available": True,
        "note": note,
        "model_name": d.get("model_name") or endpoint["model_name"],
        "version": int(version) if str(version).isdigit() else endpoint["version"],
        "endpoint_version": endpoint["version"],
        "drift_scoring": d.get("drift_scoring") is not False,
        "scored": _int(d.get("scored")),
        "outliers": _int(d.get("outliers")),
        "window": {"size": size, "outliers": outliers, "capacity": _int(window.get("capacity"), size)},
        "threshold": _num(d.get("threshold")),
        "quantile": _num(d.get("quantile")),
        "test": d.get("test") if isinstance(d.get("test"), dict) else None,
        "source": source,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def fmt_pair(rate: float, max_rate: float) -> tuple[str, str]:
    """Rate and max with 2 decimals, more if 2 would make them look equal."""
    for digits in (2, 4, 6):
        a, b = f"{rate:.{digits}f}", f"{max_rate:.{digits}f}"
        if a != b or rate == max_rate:
            return a, b
    return f"{rate!r}", f"{max_rate!r}"


# -------------------------------------------------------------------- plot
def _histograms(d: dict[str, Any]):
    """(edges, training counts | None, live counts | None, live beyond the edges) as numpy arrays."""
    import numpy as np

    train = d.get("training_histogram") if isinstance(d.get("training_histogram"), dict) else None
    live = d.get("live_histogram") if isinstance(d.get("live_histogram"), dict) else None
    recent = d.get("recent_errors") if isinstance(d.get("recent_errors"), list) else None
    edges = train_counts = None
    try:
        if train is not None:
            edges = np.asarray(train["edges"], dtype=np.float64)
            train_counts = np.asarray(train["counts"], dtype=np.float64)
            if edges.ndim != 1 or train_counts.shape != (edges.size - 1,) or edges.size < 2:
                edges = train_counts = None
    except (KeyError, TypeError, ValueError):
        edges = train_counts = None
    recent_arr = None
    if recent:
        try:
            recent_arr = np.asarray(recent, dtype=np.float64).ravel()
        except (TypeError, ValueError):
            recent_arr = None
    live_counts, beyond = None, 0
    if edges is not None and live is not None:
        try:
            lc = np.asarray(live["counts"], dtype=np.float64)
            if lc.shape == train_counts.shape and np.allclose(np.asarray(live["edges"], dtype=np.float64), edges):
                live_counts = lc
                beyond = _int(live.get("underflow")) + _int(live.get("overflow"))
        except (KeyError, TypeError, ValueError):
            live_counts = None
    if live_counts is None and recent_arr is not None and recent_arr.size:
        if edges is None:
            finite = recent_arr[np.isfinite(recent_arr)]
            edges = np.histogram_bin_edges(finite if finite.size else [0.0, 1.0], bins=50)
        finite = recent_arr[np.isfinite(recent_arr)]
        live_counts, _ = np.histogram(finite, bins=edges)
        live_counts = live_counts.astype(np.float64)
        beyond = int(recent_arr.size - live_counts.sum())
    if live_counts is not None and live_counts.sum() + beyond == 0:
        live_counts = None
    return edges, train_counts, live_counts, beyond


def plot(path: str, d: dict[str, Any], summary: dict[str, Any]) -> None:
    import numpy as np
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges, train_counts, live_counts, beyond = _histograms(d)
    rate_s, max_s = fmt_pair(summary["rate"], summary["max_rate"])
    fig, ax = plt.subplots(figsize=(9, 5.4), dpi=110)
    try:
        if edges is not None:
            widths = np.diff(edges)
            if train_counts is not None and train_counts.sum() > 0:
                density = train_counts / (train_counts.sum() * widths)
                ax.stairs(density, edges, fill=True, alpha=0.35, color="tab:blue", label="training data")
                ax.stairs(density, edges, color="tab:blue", linewidth=1.2)
            if live_counts is not None:
                total = live_counts.sum() + beyond  # out-of-range errors keep their share of the mass
                density = live_counts / (total * widths)
                label = f"live traffic ({int(total)} recent images"
                label += f", {beyond} outside the plotted range)" if beyond else ")"
                ax.stairs(density, edges, color="tab:orange", linewidth=2.0, label=label)
            ax.set_xlim(edges[0], edges[-1] + 0.02 * (edges[-1] - edges[0]))
        threshold = summary["threshold"]
        if threshold is not None:
            label = f"threshold {threshold:.4g}" + (f" (q={summary['quantile']:g})" if summary["quantile"] else "")
            ax.axvline(threshold, color="tab:red", linestyle="--", linewidth=1.5, label=label)
        if live_counts is None or edges is None:
            reason = summary["note"] or ("no live histogram from the server" if edges is not None
                                         else "no histograms from the server")
            ax.text(0.5, 0.6, reason, transform=ax.transAxes, ha="center", va="center", fontsize=13, color="0.25",
                    bbox={"facecolor": "white", "edgecolor": "0.6", "boxstyle": "round,pad=0.4", "alpha": 0.95})
        ax.set_xlabel("reconstruction error of the concept model (mean squared error per image)")
        ax.set_ylabel("density")
        verdict = "OK" if summary["passed"] else "ABOVE MAX"
        ax.set_title(f"{summary['model_name']} version {summary['version']}: drift rate {rate_s} "
                     f"(max {max_s}) — {verdict}")
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
        if ax.get_legend_handles_labels()[0]:  # below the axes: never hides the data
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, frameon=False, fontsize=9)
        fig.tight_layout()
        tmp = f"{path}.tmp.png"
        fig.savefig(tmp)
        os.replace(tmp, path)
    finally:
        plt.close(fig)


# ------------------------------------------------------------------ report
def write_markdown(path: str, s: dict[str, Any]) -> None:
    rate_s, max_s = fmt_pair(s["rate"], s["max_rate"])
    w = s["window"]
    threshold = "n/a" if s["threshold"] is None else f"{s['threshold']:.6g}"
    lines = [
        f"# Drift monitor: {s['model_name']} version {s['version']} — {'OK' if s['passed'] else 'ABOVE MAX'}",
        "",
        "| | |",
        "|---|---:|",
        f"| version | {s['version']} |",
        f"| live requests scored (images) | {s['scored']} |",
        f"| outliers | {s['outliers']} |",
        f"| recent window | {w['outliers']} outliers of {w['size']} images |",
        f"| **drift rate** | **{rate_s}** (max {max_s}) |",
        f"| threshold | {threshold} |",
        "",
    ]
    if s["note"]:
        lines += [f"Note: {s['note']}.", ""]
    lines += [f"Source: `{s['source']}` at {s['when']}.", "", "![drift](drift.png)", ""]
    write_text_atomic(path, "\n".join(lines))


def run() -> None:
    cfg = settings()
    endpoint = load_endpoint(cfg["endpoint_dir"])
    make_dir("OUTPUT_DIR", cfg["output_dir"])
    out = cfg["output_dir"]
    if not drift_url(endpoint) and not (endpoint.get("inputs_url") and cfg["concept_dir"]):
        s = not_available(endpoint, cfg["max_rate"])
        if endpoint.get("inputs_url"):
            s["note"] += (" (it gives live inputs, but the stable version has no concept model and CONCEPT_DIR"
                          " names none to score them)")
        write_json_atomic(os.path.join(out, "drift.json"), s)
        plot(os.path.join(out, "drift.png"), {}, s)
        write_markdown(os.path.join(out, "report.md"), s)
        log(STAGE, f"{s['note']}: {s['model_name']} version {s['version']} not scored")
        log(STAGE, f"wrote drift.json, report.md, drift.png to {out}")
        return
    with HttpClient(cfg["timeout"]) as client:
        if drift_url(endpoint):
            data, source = fetch(client, endpoint)
        else:
            inputs, source = fetch_inputs(client, endpoint)
            data = score_inputs(cfg["concept_dir"], inputs, endpoint, source)
    s = summarize(data, endpoint, cfg["max_rate"], source)
    write_json_atomic(os.path.join(out, "drift.json"), s)
    plot(os.path.join(out, "drift.png"), data, s)
    write_markdown(os.path.join(out, "report.md"), s)

    rate_s, max_s = fmt_pair(s["rate"], s["max_rate"])
    w = s["window"]
    detail = s["note"] or f"{w['outliers']} of {w['size']} recent live images above the threshold"
    log(STAGE, f"drift rate {rate_s} (max {max_s}) on {s['model_name']} version {s['version']}: {detail}; "
               f"{s['scored']} live images scored in all")
    log(STAGE, f"wrote drift.json, report.md, drift.png to {out}")
    if not s["passed"]:
        print(f"{STAGE}: drift rate {rate_s} > max {max_s} on {s['model_name']} version {s['version']}",
              file=sys.stderr, flush=True)
        raise SystemExit(EXIT_DRIFT)


if __name__ == "__main__":
    main(STAGE, run)
