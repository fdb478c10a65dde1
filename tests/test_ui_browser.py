"""``mlflowctl ui`` in a real browser: Debian's headless Chromium driven by Playwright, no download.

The state is real: the test runs the pipeline with tiny training settings
(version 1 promoted), a second run whose gate rejects version 2, live
traffic on the model server and an on-demand ``mlflowctl monitor``. Then
``mlflowctl ui`` serves it on 127.0.0.1 and the page is checked the way a
user looks at it: the graph, the verdicts, the drift chart (a screenshot with
real content), no console errors, and live updates while ``doit`` runs.

Set ``MLFLOWCTL_UI_SCREENSHOT=docs/ui.png`` to write the README's screenshot.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import subprocess
import time
from pathlib import Path

import pytest
import requests

from conftest import VENV_BIN, doit_env, make_project
from mlflowctl.ui import POLL_SECONDS as POLL
from test_e2e import SMALL, doit, free_port, mlflowctl
from ui_fixtures import Ui

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("MLFLOWCTL_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]
STAGES = ["data", "train_model", "train_concept", "register", "deploy", "integration_test", "promote", "monitor"]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        message = f"{CHROMIUM} not found (make browser installs Debian's chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield chromium
        chromium.close()


class Page:
    """A browser page that records console errors and uncaught exceptions."""

    def __init__(self, browser, url: str) -> None:
        self.context = browser.new_context(viewport={"width": 1200, "height": 900})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(f"console {m.type}: {m.text}")
                     if m.type in ("error", "warning") else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        self.page.goto(url)
        self.page.wait_for_selector("svg.graph")

    def states(self) -> dict[str, str]:
        """data-state of every box of the graph, by stage."""
        nodes = self.page.locator("svg.graph a.node")
        return {nodes.nth(i).get_attribute("data-stage"): nodes.nth(i).get_attribute("data-state")
                for i in range(nodes.count())}

    def row(self, stage: str):
        return self.page.locator(f"tr#stage-{stage}")

    def close(self) -> None:
        self.context.close()


@contextlib.contextmanager
def served(browser, root: Path, *overrides: str):
    """``mlflowctl ui`` on ``root`` and a browser page on it; both closed afterwards (Ctrl-C for the ui)."""
    ui = Ui(root, *overrides)
    try:
        page = Page(browser, ui.url)
        try:
            yield page
        finally:
            page.close()
    finally:
        ui.stop()


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    """A real pipeline state: version 1 stable, version 2 rejected by the gate, live traffic, two reports."""
    port = free_port()
    root = make_project(tmp_path_factory.mktemp("ui") / "proj", SMALL.format(port=port, grpc_port=free_port()))
    try:
        doit(root, "-n", "2")
        bad = doit(root, "train_model.seed=7", "integration_test.min_accuracy=0.99", check=False)
        assert bad.returncode == 1 and "version 2 not promoted" in bad.stdout + bad.stderr, bad.stdout + bad.stderr
        rng = random.Random(0)
        noise = [[rng.random() for _ in range(784)] for _ in range(10)]
        r = requests.post(f"http://127.0.0.1:{port}/v1/models/fmnist:predict", json={"instances": noise}, timeout=30)
        assert r.status_code == 200
        mlflowctl(root, "monitor", "monitor.max_drift_rate=1.0")
        yield root, port
    finally:
        subprocess.run([str(VENV_BIN / "mlflowctl"), "-C", str(root), "serve", "stop"], env=doit_env(),
                       capture_output=True, timeout=60)


def non_blank(png: bytes) -> tuple[int, float]:
    """(distinct colours, share of pixels that are not the background) of a screenshot."""
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    colors = img.getcolors(maxcolors=1 << 22) or []
    most = max(colors)[0] if colors else img.width * img.height
    return len(colors), 1 - most / (img.width * img.height)


def test_the_page_shows_the_pipeline_the_verdicts_and_drift(state, browser, tmp_path):
    root, port = state
    with served(browser, root) as page:
        p = page.page
        assert page.states() == {name: "fresh" for name in STAGES}
        for name in STAGES:
            row = page.row(name)
            assert row.get_attribute("data-state") == "fresh" and "up to date" in row.inner_text()
            assert re.search(r"\d", row.locator("td").nth(3).inner_text()), f"{name}: no last duration"
        assert len(page.page.locator("svg.graph path.edge").all()) == 10  # one per input (monitor reads promote's result only: the stable version's own concept model)
        # the stored log is one click away
        with p.expect_popup() as popup:
            page.row("train_model").locator("a.log-link").click()
        log = popup.value
        log.wait_for_load_state()
        text = log.inner_text("body")
        assert text.startswith("# file://.mlflowctl/store results/train_model/") and len(text.splitlines()) > 3, text
        log.close()

        rows = p.locator("tr.version-row")
        assert rows.count() == 2
        v2, v1 = p.locator('tr.version-row[data-version="2"]'), p.locator('tr.version-row[data-version="1"]')
        assert v2.get_attribute("data-state") == "rejected" and v2.get_attribute("data-labels") == ""
        assert "below the floor 0.9900" in v2.inner_text() and "✗" in v2.inner_text()
        assert v1.get_attribute("data-state") == "promoted" and v1.get_attribute("data-labels") == "stable"
        assert "vs 0.6000 ✓" in v1.inner_text() and "noisy" in v1.inner_text()
        curl = p.locator("#curl-1").inner_text()
        assert f"http://127.0.0.1:{port}/v1/models/fmnist:predict" in curl
        answer = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=60)
        predictions = json.loads(answer.stdout)["predictions"]
        assert len(predictions) == 1 and len(predictions[0]) == 10, answer.stdout + answer.stderr

        chart = p.locator("#drift-chart svg")
        assert chart.locator("circle.report-point").count() == 2  # the monitor stage and mlflowctl monitor
        assert chart.locator("line.threshold").count() == 1 and chart.locator("circle.live-point").count() == 1
        assert "100.0 %" in p.locator("#live-rate").inner_text()  # 10 noise images, all out of distribution
        hist = p.locator("#histogram")
        assert hist.get_attribute("data-version") == "1"
        assert hist.locator("path.train-area").count() == 1 and hist.locator("path.live-area").count() == 1
        colors, ink = non_blank(p.locator("#drift-chart").screenshot())
        assert colors >= 8 and ink > 0.03, (colors, ink)
        colors, ink = non_blank(hist.screenshot())
        assert colors >= 8 and ink > 0.03, (colors, ink)
        # choosing version 2 redraws the histogram without reloading
        p.evaluate("window.__marker = 'kept'")
        p.locator('a.pick[data-version="2"]').click()
        p.wait_for_selector('#histogram[data-version="2"]', timeout=15000)
        assert p.evaluate("window.__marker") == "kept"

        shot = p.screenshot(full_page=True)
        (tmp_path / "ui.png").write_bytes(shot)
        if os.environ.get("MLFLOWCTL_UI_SCREENSHOT"):
            p.locator('a.pick[data-version="1"]').click()
            p.wait_for_selector('#histogram[data-version="1"]', timeout=15000)
            from PIL import Image

            small = Image.open(io.BytesIO(p.screenshot(full_page=True))).convert("RGB")
            small.quantize(colors=128, method=Image.Quantize.FASTOCTREE).save(
                os.environ["MLFLOWCTL_UI_SCREENSHOT"], optimize=True)
        assert page.errors == []


def test_a_changed_parameter_shows_its_reason(state, browser):
    root, _ = state
    with served(browser, root, "train_model.learning_rate=0.002") as page:
        states = page.states()
        assert states["train_model"] == "stale" and states["register"] == "stale"
        assert states["data"] == states["train_concept"] == "fresh"
        assert "param learning_rate changed: 0.001 -> 0.002" in page.row("train_model").inner_text()
        assert "input train_model will change first" in page.row("register").inner_text()
        assert "train_model.learning_rate=0.002" in page.page.locator("#header").inner_text()
        assert page.errors == []


def test_a_corrupted_report_shows_in_its_row_and_the_page_still_loads(state, browser):
    root, _ = state
    status = root / ".mlflowctl" / "store" / "models" / "fmnist" / "status" / "2.json"
    report = sorted((root / ".mlflowctl" / "monitor").iterdir())[-1] / "drift.json"
    saved = status.read_text(), report.read_text()
    status.write_text("{broken")
    report.write_text("")
    try:
        with served(browser, root) as page:
            p = page.page
            v2 = p.locator('tr.version-row[data-version="2"]')
            assert "models/fmnist/status/2.json: not valid JSON" in v2.locator(".row-error").inner_text()
            assert p.locator('tr.version-row[data-version="1"]').get_attribute("data-state") == "promoted"
            bad = p.locator('tr.report-row[data-source="on-demand"]')
            assert bad.count() == 1 and "drift.json: not valid JSON" in bad.inner_text()
            assert p.locator('tr.report-row[data-source="stage"]').count() == 1
            assert page.states() == {name: "fresh" for name in STAGES}
            assert page.errors == []
    finally:
        status.write_text(saved[0])
        report.write_text(saved[1])


def test_no_state_folder_yet_says_run_doit(browser, tmp_path):
    root = make_project(tmp_path / "empty")
    assert not (root / ".mlflowctl").exists()
    with served(browser, root) as page:
        p = page.page
        assert p.locator("#nothing-has-run").inner_text() == "nothing has run; run `doit`"
        assert set(page.states().values()) == {"stale"}
        assert "never run with this store" in page.row("data").inner_text()
        assert "input data will change first" in page.row("train_model").inner_text()
        assert "no versions yet" in p.locator("#versions").inner_text()
        assert "no drift figures yet" in p.locator("#drift-chart").inner_text()
        assert page.errors == []


def test_the_page_follows_doit_without_reloading(state, browser):
    """Last in the module: it changes the project's config and re-runs a stage."""
    root, _ = state
    with served(browser, root) as page:
        p = page.page
        p.evaluate("window.__marker = 'no reload'")
        updates = int(p.evaluate("document.body.dataset.updates || '0'"))
        config = root / "mlflowctl.yaml"
        config.write_text(config.read_text().replace("samples: 300", "samples: 6000"))
        p.wait_for_selector('tr#stage-integration_test[data-state="stale"]', timeout=30000)
        assert "param samples changed: 300 -> 6000" in page.row("integration_test").inner_text()
        assert page.states()["promote"] == "stale" and page.states()["data"] == "fresh"
        run = subprocess.Popen([str(VENV_BIN / "doit"), "integration_test"], cwd=root, env=doit_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        started, seen, took = time.monotonic(), set(), None
        deadline = started + 300
        while time.monotonic() < deadline:
            seen.add(page.row("integration_test").get_attribute("data-state"))
            if run.poll() is not None:
                took = took or time.monotonic() - started
                if "fresh" in seen:
                    break
            p.wait_for_timeout(200)
        output = run.communicate(timeout=60)[0]
        assert run.returncode == 0, output
        assert took is not None, seen
        if took > 2 * POLL + 1:  # long enough for the page to have seen it run (it usually is)
            assert "running" in seen, (took, seen)
        p.wait_for_selector('tr#stage-integration_test[data-state="fresh"]', timeout=30000)
        assert "input integration_test has a new result" in page.row("promote").inner_text()
        assert p.evaluate("window.__marker") == "no reload"
        assert int(p.evaluate("document.body.dataset.updates")) >= updates + 2
        assert "stale" in seen and "fresh" in seen, seen
        assert page.errors == []
