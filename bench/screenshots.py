"""Refresh the dashboard screenshots the README shows (docs/img/): a chaos drill's pages as a user
sees them.

Two runs of the quickstart's tiny job on two simulated nodes, 200 steps: a clean one, and one whose
rank 1 is killed at step 80. Then, in headless Chromium (Debian's `chromium`, driven by
Playwright): the chaos run's page at 1280x800 (`dashboard.png`), with its fault opened
(`dashboard-fault.png`), at 800 px wide (`dashboard-800.png`), and both runs compared
(`dashboard-compare.png`).
Usage: python bench/screenshots.py [--out docs/img]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
CHROMIUM = "/usr/bin/chromium"


def job(work: str) -> str:
    from resilient.training.corpus import write_corpus

    write_corpus(f"{work}/corpus.txt", lines=2000)
    path = f"{work}/drill.toml"
    with open(path, "w") as f:
        f.write(
            f"""name = "drill"
[cluster]
num_workers = 2
local_nodes = 2
[model]
builtin = "tiny-llama"
[peft]
method = "lora"
r = 4
lora_alpha = 8
target_modules = ["q_proj", "v_proj"]
[data]
path = "{work}/corpus.txt"
seq_len = 64
[train]
steps = 200
batch_size = 4
seed = 7
[checkpoint]
storage = "{work}/runs"
every = 5
[eval]
split = 0.1
every = 50
"""
        )
    return path


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "resilient.cli", *args], check=True, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dashboard(*runs: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    p = subprocess.Popen(
        [sys.executable, "-m", "resilient.cli", "dashboard", *runs, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}/"
    for _ in range(240):
        try:
            urllib.request.urlopen(base, timeout=1)
            return p, base
        except OSError:
            time.sleep(0.25)
    p.kill()
    raise SystemExit(f"the dashboard of {runs} never answered")


def shoot(base: str, compare: str, out: str) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = b.new_page(viewport={"width": 1280, "height": 800})
        page.goto(base)
        page.wait_for_selector("#faults tbody tr[data-fault]", timeout=60_000)
        page.wait_for_timeout(1500)  # the charts settle
        page.screenshot(path=f"{out}/dashboard.png", full_page=True)
        page.click("#faults tbody tr[data-fault]")
        page.wait_for_selector("tr.evidence pre", timeout=10_000)
        page.locator("tr.evidence").scroll_into_view_if_needed()
        page.screenshot(path=f"{out}/dashboard-fault.png")
        narrow = b.new_page(viewport={"width": 800, "height": 1000})
        narrow.goto(base)
        narrow.wait_for_selector("#faults tbody tr[data-fault]", timeout=60_000)
        narrow.wait_for_timeout(1500)
        narrow.screenshot(path=f"{out}/dashboard-800.png", full_page=True)
        cmp = b.new_page(viewport={"width": 1280, "height": 800})
        cmp.goto(compare)
        cmp.wait_for_selector("#cmp_loss .main-svg", timeout=60_000)
        cmp.wait_for_timeout(1500)
        cmp.screenshot(path=f"{out}/dashboard-compare.png")
        b.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(HERE, "..", "docs", "img"))
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="shots-") as work:
        spec = job(work)
        quiet = {"stdout": subprocess.DEVNULL}
        print("a clean run and a run with a kill (about two minutes)", flush=True)
        cli("launch", spec, "--run-id", "clean", **quiet)
        kill = 'chaos=[{at_step = 80, fault = "kill", rank = 1}]'
        cli("launch", spec, "--run-id", "kill", "--set", kill, **quiet)
        runs = f"{work}/runs/drill"
        one, base = dashboard(f"{runs}/kill")
        two, compare = dashboard(f"{runs}/clean", f"{runs}/kill")
        try:
            shoot(base, compare, out)
        finally:
            for p in (one, two):
                p.terminate()
                p.wait(timeout=10)
    for name in ("dashboard", "dashboard-fault", "dashboard-800", "dashboard-compare"):
        print(f"{out}/{name}.png")


if __name__ == "__main__":
    main()
