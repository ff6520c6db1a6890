"""End to end in a real browser: headless Chromium (Debian's `chromium`, driven by Playwright) fills the submit form
for a fast tiny run, follows it to the end on the run page, and opens its MLflow run through the page's link.

The console runs as `dsaforge ui` against an `mlflow server` on 127.0.0.1 given through MLFLOW_TRACKING_URI, as a
deployment would. Screenshots go to build/test-artifacts/console/ (or $DSAFORGE_TEST_ARTIFACTS).
Run: python -m pytest tests/console/test_browser.py -q   (needs `apt-get install chromium`; `make system-deps`)
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.console.conftest import mlflow_server
from tests.helpers import free_port, stop, wait_http

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
# The tiny preset cut to a few steps of each stage: every stage still runs for real, in about a minute on 2 cores.
FAST = {"data": {"data.max_documents": "60", "data.tokenizer_train_bytes": "300000"},
        "train": {"train.pretrain.steps": "4", "train.pretrain.warmup_steps": "1", "train.warmup.steps": "2",
                  "train.sparse.steps": "2"},
        "synth": {"synth.tasks_per_class": "1", "synth.envs_per_class": "1"},
        "tracking": {"tracking.system_metrics": "false"}}

pytestmark = [pytest.mark.browser, pytest.mark.slow,
              pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                                 reason="Debian's chromium is not installed (apt-get install chromium; make system-deps)")]


@pytest.fixture(scope="module")
def shots():
    out = Path(os.environ.get("DSAFORGE_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "build" / "test-artifacts"))
    out = out / "console"
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    with mlflow_server(root) as mlflow:
        env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow}
        port = free_port()
        ui = subprocess.Popen([sys.executable, "-m", "dsaforge", "ui", "--home", str(root / ".dsaforge"),
                               "--port", str(port)], cwd=root, env=env, stdout=open(root / "ui.log", "w"),
                              stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_http(f"http://127.0.0.1:{port}/healthz", 120)
            yield f"http://127.0.0.1:{port}", mlflow, root
        finally:
            stop(ui)


def test_submit_follow_and_open_in_mlflow(servers, shots):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    console, mlflow, root = servers
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        try:
            page.goto(console + "/pipelines")
            assert page.locator('svg.graph g.node[data-task="sparse"]').count() == 1
            page.screenshot(path=str(shots / "1-pipelines.png"), full_page=True)

            page.goto(console + "/submit?pipeline=end-to-end&preset=tiny")
            for section, fields in FAST.items():
                details = page.locator("details.section", has=page.locator("summary", has_text=re.compile(f"^{section}$")))
                if details.get_attribute("open") is None:
                    details.locator("summary").click()
                for name, value in fields.items():
                    field = page.locator(f'[name="{name}"]')
                    if field.evaluate("e => e.tagName") == "SELECT":
                        field.select_option(value)
                    else:
                        field.fill(value)
            page.screenshot(path=str(shots / "2-submit.png"), full_page=True)
            page.locator("#submit").click()
            page.wait_for_url(re.compile(r".*/runs/[0-9a-f]{32}$"))
            run_url = page.url
            page.screenshot(path=str(shots / "3-running.png"), full_page=True)

            # The page polls while the run is active and reloads itself when it ends.
            final = re.compile(r"^\s*(succeeded|failed|cancelled|interrupted)\s*$")
            page.locator("#run-status", has_text=final).wait_for(timeout=600_000)
            page.wait_for_load_state()
            page.screenshot(path=str(shots / "4-finished.png"), full_page=True)
            status = page.locator("#run-status").inner_text().strip()
            assert status == "succeeded", page.locator("#log").inner_text()[-3000:]
            states = page.locator("table.steps-table [data-field=state]").all_inner_texts()
            assert states == ["succeeded"] * 5
            assert page.locator("ul.artifacts a", has_text="manifest.json").count() == 1

            page.goto(console + "/runs")
            row = page.locator(f'tr[data-run="{run_url.rsplit("/", 1)[1]}"]')
            assert row.locator("[data-field=status]").inner_text().strip() == "succeeded"
            page.screenshot(path=str(shots / "5-runs.png"), full_page=True)

            page.goto(run_url)
            link = page.locator("#mlflow-link")
            href = link.get_attribute("href")
            assert href.startswith(mlflow + "/#/experiments/")
            link.click()
            page.wait_for_url(re.compile(re.escape(mlflow) + r"/#/experiments/\d+/runs/[0-9a-f]{32}"))
            page.get_by_text(re.compile(r"end-to-end-[0-9a-f]{8}")).first.wait_for(timeout=60_000)
            page.screenshot(path=str(shots / "6-mlflow-run.png"), full_page=True)
        finally:
            browser.close()
