"""The page in a real browser: Chromium from the distribution (headless), driven by Playwright.

One story, as a new user lives it, on the bundled toy model: open the page, generate; upload five images,
train a short textual inversion and watch it finish with a grid; generate with the new token; cancel a
second job; stop the page mid-run and start it again, and find the run going on. A screenshot of each step
goes to test-artifacts/ui/. ``.ci/run`` installs Debian's chromium and sets CONCEPTOR_BROWSER, so there a
missing browser fails the test instead of skipping it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api")

REPO = Path(__file__).parent.parent
TOY_IMAGES = REPO / "conceptor" / "toyworld" / "concept"
ARTIFACTS = REPO / "test-artifacts" / "ui"
BROWSER = os.environ.get("CONCEPTOR_BROWSER") or shutil.which("chromium") or "/usr/bin/chromium"
if not Path(BROWSER).exists():
    if os.environ.get("CONCEPTOR_BROWSER"):
        raise RuntimeError(f"CONCEPTOR_BROWSER={BROWSER} does not exist; install Debian's chromium")
    pytest.skip("no Chromium (apt-get install chromium, or set CONCEPTOR_BROWSER)", allow_module_level=True)

JOB_TIMEOUT_MS = 240_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``conceptor ui`` as a user starts it: a separate process, stopped like Ctrl-C stops it."""

    def __init__(self, runs: Path, log: Path):
        self.runs, self.log = runs, log

    def start(self) -> str:
        port = _free_port()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
        self.out = open(self.log, "a")
        self.proc = subprocess.Popen([sys.executable, "-m", "conceptor", "ui", "--runs-dir", str(self.runs),
                                      "--port", str(port)], stdout=self.out, stderr=subprocess.STDOUT, env=env)
        end = time.time() + 120
        while time.time() < end:
            text = self.log.read_text()
            found = re.findall(r"conceptor ui: (http://127\.0\.0\.1:\d+/)", text)
            if found and found[-1].endswith(f":{port}/"):
                return found[-1]
            if self.proc.poll() is not None:
                raise AssertionError(f"conceptor ui exited:\n{text[-3000:]}")
            time.sleep(0.2)
        raise AssertionError(f"conceptor ui did not start:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=BROWSER, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def fill(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} textarea, #{elem_id} input:not([type=range]):not([type=checkbox])").first
    box.fill(str(value))
    box.press("Tab")


def job_status(page) -> tuple[str, float]:
    status = page.locator("#job-status")
    bar = page.locator("#job-progress .bar")
    return status.get_attribute("data-status"), float(bar.get_attribute("data-fraction"))


def wait_status(page, wanted: str, timeout_ms: int = JOB_TIMEOUT_MS) -> None:
    page.wait_for_selector(f'#job-status[data-status="{wanted}"]', timeout=timeout_ms)


def start_job(page, steps: int, token: str, grid_every: int) -> str:
    """Upload the toy images, fill the Train tab for a textual inversion and start it; returns the job id."""
    upload(page)
    fill(page, "token", token)
    fill(page, "init-word", "object")
    fill(page, "train-steps", steps)
    fill(page, "batch-size", 2)
    fill(page, "validation-every", grid_every)
    before = page.locator("#train-msg textarea").input_value()
    page.locator("#start").click()
    page.wait_for_function("v => { const m = document.querySelector('#train-msg textarea').value; "
                           "return m.startsWith('job ') && m !== v; }", arg=before, timeout=60_000)
    message = page.locator("#train-msg textarea").input_value()
    return message.split()[1].rstrip(":")


def upload(page) -> None:
    files = [str(TOY_IMAGES / f"{i}.png") for i in range(5)]
    page.locator("#upload input[type=file]").set_input_files(files)
    page.wait_for_function("document.querySelectorAll('#upload tbody tr, #upload .file').length >= 5",
                           timeout=30_000)


def test_the_page_from_first_image_to_a_trained_concept(browser, tmp_path):
    runs = tmp_path / "runs"
    server = Server(runs, tmp_path / "ui.log")
    url = server.start()
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    try:
        t0 = time.perf_counter()
        page.goto(url)
        page.wait_for_selector("#generate-btn")
        print(f"first page rendered in {time.perf_counter() - t0:.2f} s")
        shot(page, "01-opened")

        # Generate on the bundled model: the first page already works offline.
        fill(page, "prompt", "a red circle")
        fill(page, "steps", 5)
        page.locator("#generate-btn").click()
        page.wait_for_selector("#gallery img", timeout=60_000)
        info = page.locator("#gen-info textarea").input_value()
        assert info.startswith("a red circle\nSteps: 5,") and "Model: conceptor-toyworld" in info
        shot(page, "02-generated")

        # Train: upload five concept images, a short textual inversion, watch it to the end.
        tab(page, "Train")
        page.get_by_text("advanced").click()
        job1 = start_job(page, steps=6, token="<ui-thing>", grid_every=3)
        shot(page, "03-training")
        wait_status(page, "done")
        page.wait_for_selector("#grids img", timeout=30_000)
        assert job_status(page) == ("done", 1.0)
        assert page.locator("#grids img").count() >= 2  # step 0, 3 and the last
        assert page.locator("#loss img").count() == 1  # the loss curve
        assert page.locator(f'#queue tr[data-job="{job1}"]').get_attribute("data-status") == "done"
        shot(page, "04-trained")
        state = json.loads((runs / job1 / "job.json").read_text())
        assert state["status"] == "done" and (runs / job1 / "output" / "learned_embeds.safetensors").is_file()
        assert sorted(p.name for p in (runs / job1 / "images").iterdir()) == [f"{i}.png" for i in range(5)]

        # The new token is in Generate: a chip inserts it, the image uses it.
        tab(page, "Generate")
        page.locator("#refresh").click()
        page.locator("#embeddings").get_by_text("<ui-thing>").click()
        page.wait_for_function("document.querySelector('#prompt textarea').value.includes('<ui-thing>')")
        fill(page, "prompt", "a photo of a <ui-thing>")
        page.locator("#generate-btn").click()
        page.wait_for_function("document.querySelector('#gen-info textarea').value.startsWith('a photo of a <ui')",
                               timeout=60_000)
        assert "Conceptor embeddings: learned_embeds.safetensors" in page.locator("#gen-info textarea").input_value()
        shot(page, "05-generated-with-token")

        # Cancel a second job while it runs.
        tab(page, "Train")
        job2 = start_job(page, steps=5000, token="<ui-cancel>", grid_every=5000)
        wait_status(page, "running", 60_000)
        page.locator("#cancel").click()
        wait_status(page, "cancelled", 90_000)
        assert json.loads((runs / job2 / "job.json").read_text())["status"] == "cancelled"
        shot(page, "06-cancelled")

        # Stop the page mid-run, start it again: the run is found, still going, and finishes.
        job3 = start_job(page, steps=40, token="<ui-restart>", grid_every=40)
        page.wait_for_function("parseFloat(document.querySelector('#job-progress .bar')?.dataset.fraction) > 0",
                               timeout=JOB_TIMEOUT_MS)
        worker = json.loads((runs / job3 / "job.json").read_text())["pid"]
        server.stop()
        url = server.start()
        page.goto(url)
        tab(page, "Train")
        page.wait_for_function(f"document.querySelector('#job-status')?.textContent.includes('{job3}')",
                               timeout=30_000)
        shot(page, "07-after-restart")
        wait_status(page, "done")
        state = json.loads((runs / job3 / "job.json").read_text())
        assert state["attempts"] == 1 and state["pid"] == worker  # the same process went on, never restarted
        shot(page, "08-restarted-run-done")

        # Runs: the finished run, its files, a conversion to A1111's format.
        tab(page, "Runs")
        page.locator("#run-refresh").click()
        page.locator("#run input").click()
        page.get_by_role("option", name=job1).click()
        page.wait_for_function("document.querySelector('#run-config textarea')?.value.includes('textual-inversion')",
                               timeout=30_000)
        page.locator("#convert").click()
        page.wait_for_function("document.querySelector('#run-msg textarea').value.startsWith('wrote')",
                               timeout=30_000)
        assert (runs / job1 / "output" / "converted" / "learned_embeds-a1111.pt").is_file()
        shot(page, "09-runs")
    finally:
        shot(page, "99-last")
        page.close()
        server.stop()
        for state in runs.glob("*/job.json"):  # no worker outlives the test
            pid = json.loads(state.read_text()).get("pid")
            if pid:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
