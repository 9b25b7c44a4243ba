"""What the dashboard costs on a long run's directory: each API answer's time and size, and the
page's load in headless Chromium.

`resilient dashboard RUN_DIR` on a free port; every endpoint asked twice (cold: the run directory
read for the first time; warm: what a poll costs), with the answer's bytes and its longest list;
then the page loaded in Chromium (Debian's `chromium`, via Playwright) until its charts and fault
table are drawn, with the bytes it fetched, and one poll's incremental metrics answer.
Usage: python bench/dashboard_load.py RUN_DIR [--json OUT]
(a soak's run directory: python bench/soak.py --keep DIR)
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.request

ENDPOINTS = ("/api/state", "/api/timeline", "/api/metrics", "/api/events", "/api/checkpoints",
             "/api/cluster", "/api/fault/0")  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def longest(x) -> int:
    if isinstance(x, list):
        return max([len(x)] + [longest(v) for v in x])
    if isinstance(x, dict):
        return max([0] + [longest(v) for v in x.values()])
    return 0


def ask(url: str) -> tuple[float, int, object]:
    t0 = time.perf_counter()
    try:
        body = urllib.request.urlopen(url, timeout=120).read()
    except urllib.error.HTTPError as e:  # a run without faults has no /api/fault/0
        body = e.read()
    return time.perf_counter() - t0, len(body), json.loads(body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args()
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "resilient.cli", "dashboard", args.run_dir, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(base + "/", timeout=1)
                break
            except OSError:
                time.sleep(0.25)
        rows = {}
        for path in ENDPOINTS:
            cold_s, size, body = ask(base + path)
            warm_s, _, _ = ask(base + path)
            rows[path] = {"cold_s": round(cold_s, 3), "warm_s": round(warm_s, 3), "bytes": size,
                          "longest_list": longest(body)}  # fmt: skip
        cursor = ask(base + "/api/metrics")[2].get("cursor")
        poll_s, poll_bytes, _ = ask(f"{base}/api/metrics?cursor={cursor}")
        page = load_page(base)
    finally:
        server.terminate()
        server.wait(timeout=10)
    result = {"endpoints": rows, "poll": {"seconds": round(poll_s, 3), "bytes": poll_bytes},
              "page": page}  # fmt: skip
    print(f"{'endpoint':<18} {'cold s':>7} {'warm s':>7} {'bytes':>9} {'longest list':>13}")
    for path, r in rows.items():
        print(
            f"{path:<18} {r['cold_s']:>7} {r['warm_s']:>7} {r['bytes']:>9} {r['longest_list']:>13}"
        )
    print(f"a poll's metrics (nothing new since the cursor): {poll_s:.3f}s, {poll_bytes} bytes")
    print(f"page: drawn in {page['drawn_s']}s, {page['fetched_bytes']} bytes fetched "
          f"({page['api_bytes']} of them API answers)")  # fmt: skip
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)


def load_page(base: str) -> dict:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = b.new_page(viewport={"width": 1280, "height": 800})
        t0 = time.perf_counter()
        page.goto(base + "/")
        page.wait_for_selector("#loss_chart .main-svg", timeout=120_000)
        page.wait_for_function("document.querySelector('#faults tbody tr')", timeout=120_000)
        drawn = time.perf_counter() - t0
        sizes = page.evaluate(
            "performance.getEntriesByType('resource').map(e => [e.name, e.encodedBodySize])"
        )
        b.close()
    return {
        "drawn_s": round(drawn, 2),
        "fetched_bytes": sum(s for _, s in sizes),
        "api_bytes": sum(s for n, s in sizes if "/api/" in n),
    }


if __name__ == "__main__":
    main()
