"""What the page adds to a generation, and how fast its first view renders.

    python benchmarks/ui_speed.py [--steps 30] [--images 4] [--repeats 8]

The page runs as users run it, ``conceptor ui`` in its own process, driven by Debian's Chromium (headless)
on the same machine: click Generate, stop when this seed's settings line shows and every gallery image has
loaded. The reference is the same generation by ``conceptor.load(None).generate(...)`` in this process,
with the same browser open on the page. The two alternate, pair by pair, so a slow moment of a shared
machine hits both alike; the table gives the median of the per-pair ratios. Both are warm (the page keeps
its model loaded). Also: a new tab (empty cache) opening the page until Generate shows, and the same for a
one-button Gradio page (what Gradio itself costs here). Prints a markdown table for docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

DONE = ("(seed) => { const v = document.querySelector('#gen-info textarea').value;"
        " const imgs = [...document.querySelectorAll('#gallery img')];"
        " return v.includes(`Seed: ${seed},`) && imgs.length > 0"
        " && imgs.every(x => x.complete && x.naturalWidth > 0); }")


def start_page(runs: Path, log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "conceptor", "ui", "--runs-dir", str(runs), "--port", str(port)],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    end = time.time() + 120
    while time.time() < end:
        if re.search(rf"conceptor ui: http://127\.0\.0\.1:{port}/", log.read_text()):
            return proc, f"http://127.0.0.1:{port}/"
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the page did not start:\n{log.read_text()[-2000:]}")


def render_times(browser, url: str, n: int, selector: str) -> list[float]:
    times = []
    for _ in range(n + 1):  # the first warms the browser
        tab = browser.new_context().new_page()
        t = time.perf_counter()
        tab.goto(url)
        tab.wait_for_selector(selector)
        times.append(time.perf_counter() - t)
        tab.context.close()
    return times[1:]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--size", type=int, default=None, help="width and height (default: the model's, 64)")
    ap.add_argument("--browser", default=os.environ.get("CONCEPTOR_BROWSER", "/usr/bin/chromium"))
    args = ap.parse_args()

    import gradio as gr
    from playwright.sync_api import sync_playwright

    import conceptor

    prompt = "a red circle on a white background"
    tmp = Path(tempfile.mkdtemp(prefix="ui-speed-"))
    proc, url = start_page(tmp / "runs", tmp / "ui.log")
    with gr.Blocks() as bare:
        gr.Button("Go", elem_id="go")
    bare.launch(prevent_thread_lock=True, quiet=True)
    model = conceptor.load(None)
    direct, page = [], []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.browser, headless=True, args=["--no-sandbox"])
            render = render_times(browser, url, args.repeats, "#generate-btn")
            render_bare = render_times(browser, bare.local_url, args.repeats, "#go")
            tab = browser.new_page()
            tab.goto(url)
            tab.wait_for_selector("#generate-btn")
            tab.locator("#prompt textarea").fill(prompt)
            for elem, value in (("steps", args.steps), ("count", args.images), ("width", args.size or 0),
                                ("height", args.size or 0)):
                box = tab.locator(f"#{elem} input")
                box.fill(str(value))
                box.press("Tab")
            for i in range(args.repeats + 1):  # pair 0 loads the page's model and warms both
                seed = tab.locator("#seed input")
                seed.fill(str(100 + i))
                seed.press("Tab")
                t = time.perf_counter()
                tab.locator("#generate-btn").click()
                tab.wait_for_function(DONE, arg=100 + i, polling=20, timeout=300_000)
                page.append(time.perf_counter() - t)
                t = time.perf_counter()
                model.generate(prompt, num_images=args.images, steps=args.steps, seed=100 + i, width=args.size,
                               height=args.size)
                direct.append(time.perf_counter() - t)
            browser.close()
    finally:
        proc.terminate()
        proc.wait()
        bare.close()
    ratios = [g / d for g, d in zip(page[1:], direct[1:])]
    d, g = statistics.median(direct[1:]), statistics.median(page[1:])
    size = f"{args.size}x{args.size}" if args.size else "64x64"
    print(f"{args.images} images x {args.steps} steps, {size}, bundled model, {args.repeats} alternating pairs")
    print("| what | median (s) |\n|---|---|")
    print(f"| conceptor.load(None).generate(...) | {d:.3f} |")
    print(f"| the page: click Generate -> every image shown | {g:.3f} |")
    print(f"| **page / direct, median of the pairs** | **{statistics.median(ratios):.3f}x** |")
    print(f"| first render: new tab until the page's Generate button shows | {statistics.median(render):.3f} |")
    print(f"| the same for a one-button Gradio page | {statistics.median(render_bare):.3f} |")


if __name__ == "__main__":
    main()
