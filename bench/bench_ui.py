"""``mlflowctl ui``: time to first byte and full page load for a store with 100 versions and 1,000 stage runs.

The store is synthesized through the Store API (tests/ui_fixtures.py: tiny
files, written the way the pipeline writes them) in a temporary project copy.
Then ``mlflowctl ui --port 0`` serves it, and the benchmark times, over HTTP on
127.0.0.1 with a fresh connection each time:

* time to first byte of ``GET /`` (state gathered from the store + HTML rendered),
  the first request (cold: every published JSON read once) and then warm ones;
* the full page: ``/`` plus its CSS and JS, as a browser without cache loads it;
* one poll of ``/api/sections`` when something changed (the live refresh's work);
* the page load in Debian's headless chromium (navigation start to the load event,
  a fresh browser context each time), when chromium and playwright are installed.

Each timed request waits out the server's short state cache (0.5 s), so every
figure includes gathering the state again. Target: <= 300 ms. Printed, never asserted.

Usage: .venv/bin/python bench/bench_ui.py [--runs 15] [--versions 100] [--stage-runs 1000]
"""
from __future__ import annotations

import argparse
import http.client
import re
import signal
import subprocess
import sys
import time

import common as bench

sys.path.insert(0, str(bench.ROOT / "tests"))


def request(port: int, path: str) -> tuple[float, float, int, bytes]:
    """(time to first byte, total time, status, body) of one GET on a fresh connection."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers={"Host": f"127.0.0.1:{port}"})
        response = conn.getresponse()
        first = time.perf_counter() - t0
        body = response.read()
        return first, time.perf_counter() - t0, response.status, body
    finally:
        conn.close()


def series(label: str, runs: int, fn) -> list[float]:
    values = []
    for _ in range(runs):
        time.sleep(0.55)  # past the server's state cache: every figure gathers the state again
        values.append(fn())
    values.sort()
    mid = values[len(values) // 2]
    print(f"  {label:<46} median {mid * 1000:7.1f} ms   min {values[0] * 1000:7.1f}   max {values[-1] * 1000:7.1f}")
    return values


def browser_series(port: int, runs: int) -> list[float] | None:
    """Navigation start to the load event in Debian's headless chromium (when it and playwright are there)."""
    import os

    chromium = os.environ.get("MLFLOWCTL_CHROMIUM", "/usr/bin/chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("  note: playwright is not installed (pip install -e '.[test]'): no browser figure")
        return None
    if not os.path.isfile(chromium):
        print(f"  note: {chromium} not found (make browser): no browser figure")
        return None
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=args, headless=True)
        try:
            def load() -> float:
                context = browser.new_context()
                try:
                    page = context.new_page()
                    page.goto(f"http://127.0.0.1:{port}/", wait_until="load")
                    return page.evaluate("(() => { const n = performance.getEntriesByType('navigation')[0];"
                                         " return (n.loadEventEnd - n.startTime) / 1000; })()")
                finally:
                    context.close()

            return series("page load in headless chromium (load event)", runs, load)
        finally:
            browser.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--versions", type=int, default=100)
    ap.add_argument("--stage-runs", type=int, default=1000)
    args = ap.parse_args()

    bench.header(f"ui: {args.versions} versions, {args.stage_runs} stage runs; median of {args.runs}")
    project = bench.project_copy()
    proc = None
    try:
        from ui_fixtures import make_state

        t0 = time.perf_counter()
        make_state(project, versions=args.versions, runs=args.stage_runs, reports=20)
        print(f"  synthesized the store in {time.perf_counter() - t0:.1f} s")
        proc = subprocess.Popen([bench.MLFLOWCTL, "-C", str(project), "ui", "--port", "0"], env=bench.bench_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = proc.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        if not match:
            print(f"bench: mlflowctl ui did not start: {line!r} {proc.stderr.read()[-2000:]}")
            return 1
        port = int(match.group(1))
        cold_first, cold_total, status, body = request(port, "/")
        rows = len(re.findall(rb'class="version-row', body))
        print(f"  first request (cold store reads): first byte {cold_first * 1000:.1f} ms, "
              f"page {cold_total * 1000:.1f} ms, {len(body) / 1024:.0f} KiB, HTTP {status}, {rows} version rows")
        ttfb = series("time to first byte, GET /", args.runs, lambda: request(port, "/")[0])

        def full_page() -> float:
            t = time.perf_counter()
            for path in ("/", "/static/ui.css", "/static/ui.js"):
                request(port, path)
            return time.perf_counter() - t

        page = series("full page over HTTP: / + ui.css + ui.js", args.runs, full_page)
        browser_load = browser_series(port, args.runs)
        poll = series("live poll: /api/sections (changed)", args.runs,
                      lambda: request(port, "/api/sections?since=x")[1])
        mid = lambda v: v[len(v) // 2]
        bench.record("ui: time to first byte (100 versions, 1,000 runs)", mid(ttfb), "s", limit=0.3,
                     target="<= 0.3 s", note=f"cold first request {cold_first:.3f} s")
        bench.record("ui: full page load (100 versions, 1,000 runs)", mid(page), "s", limit=0.3, target="<= 0.3 s",
                     note=f"{len(body) / 1024:.0f} KiB of HTML; a live poll {mid(poll):.3f} s")
        if browser_load:
            bench.record("ui: page load in headless chromium (load event)", mid(browser_load), "s", limit=0.3,
                         target="<= 0.3 s", note="navigation start to the load event, no cache")
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        bench.remove(project)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
