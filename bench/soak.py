"""Soak: a long S3 run under random chaos, and what it costs per hour and per day.

One `resilient launch` of an endless job (the built-in tiny model, 2 workers) against moto's S3
server on loopback, which logs every request; random chaos (kill, exit, hang, slow, bitflip;
`--mtbf`), with the default health settings (adaptive hang limits, stragglers replaced, replica
digests at every persisted step);
after `--minutes` the job is preempted with SIGTERM (the preemption path is part of the soak).
`--mtbf off`: no chaos at all (a fault-free soak: every fault the supervisor acts on is false).
Reported: faults, recovered, recovery p50/p95/max and per kind, goodput, storage requests and
bytes uploaded per hour (and per day), journal bytes uploaded vs stored, objects per prefix at the
end, and the driver's and node agents' RSS over time (a leak shows as growth).
Usage: python bench/soak.py [--minutes 30] [--mtbf 60s | --mtbf off] [--json OUT] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import psutil

HOUR = 3600.0


def serve(port: int, log_path: str) -> None:
    """An S3 endpoint (moto) that logs `METHOD PATH BYTES` for every request."""
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    app, log = DomainDispatcherApplication(create_backend_app), open(log_path, "a", buffering=1)

    def logged(environ, start_response):
        log.write(
            f"{environ['REQUEST_METHOD']} {environ.get('PATH_INFO', '')} "
            f"{environ.get('CONTENT_LENGTH') or 0}\n"
        )
        return app(environ, start_response)

    make_server("127.0.0.1", port, logged, threaded=True).serve_forever()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_job(work: str, port: int) -> str:
    from resilient.training.corpus import write_corpus

    write_corpus(f"{work}/corpus.txt", lines=4000)
    spec = f"""name = "soak"
[cluster]
num_workers = 2
[data]
path = "{work}/corpus.txt"
seq_len = 64
[train]
steps = 100000000
batch_size = 4
[checkpoint]
storage = "s3://soak/runs"
every = 1
persist_every = 20
"""
    with open(f"{work}/job.toml", "w") as f:
        f.write(spec)
    return f"{work}/job.toml"


def run(args, work: str, env: dict) -> tuple[int, list[tuple[float, float]], float]:
    """The launch, preempted after `--minutes`; (exit code, driver RSS samples, seconds)."""
    cmd = [
        sys.executable,
        "-m",
        "resilient.cli",
        "launch",
        f"{work}/job.toml",
        "--run-id",
        "r",
    ]
    if args.mtbf != "off":
        cmd += ["--chaos-mtbf", args.mtbf, "--chaos-faults", "kill,exit,hang,slow,bitflip"]
        cmd += ["--chaos-seed", str(args.seed)]
    t0 = time.time()
    p = subprocess.Popen(
        cmd,
        env=env,
        stdout=open(f"{work}/launch.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    rss, proc = [], psutil.Process(p.pid)
    while p.poll() is None and time.time() - t0 < args.minutes * 60:
        try:
            rss.append((time.time() - t0, proc.memory_info().rss / 2**20, agents_rss()))
        except psutil.Error:
            break
        time.sleep(10)
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    try:
        rc = p.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        rc = p.wait()
    return rc, rss, time.time() - t0


def agents_rss() -> float:
    """The node agents' RSS together, in MiB (Ray titles their processes ray::NodeAgent)."""
    total = 0
    for q in psutil.process_iter(["cmdline"]):
        try:
            if any("NodeAgent" in part for part in q.info["cmdline"] or ()):
                total += q.memory_info().rss
        except psutil.Error:
            continue
    return total / 2**20


def storage(log_path: str, hours: float) -> dict:
    lines = [ln.split() for ln in open(log_path) if ln.strip()]
    by_method: dict[str, int] = {}
    for m, _, _ in lines:
        by_method[m] = by_method.get(m, 0) + 1
    put = [int(b) for m, p, b in lines if m in ("PUT", "POST")]
    journal_put = sum(int(b) for m, p, b in lines if m in ("PUT", "POST") and "/journal/" in p)
    return {
        "requests_per_hour": round(len(lines) / hours),
        "by_method": by_method,
        "bytes_uploaded_per_hour": round(sum(put) / hours),
        "journal_bytes_uploaded": journal_put,
    }


def objects(endpoint: str) -> dict:
    import boto3

    out: dict[str, dict] = {}
    pages = boto3.client("s3", endpoint_url=endpoint).get_paginator("list_objects_v2")
    for page in pages.paginate(Bucket="soak", Prefix="runs/soak/r/"):
        for o in page.get("Contents", []):
            parts = o["Key"].split("/")[3:]
            top = "/".join(parts[:2]) if parts[0] in ("metrics", "checkpoints") else parts[0]
            top = "checkpoints" if top.startswith("checkpoints") else top
            e = out.setdefault(top, {"objects": 0, "bytes": 0})
            e["objects"] += 1
            e["bytes"] += o["Size"]
    return out


def faults(work: str, env: dict) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "resilient.cli", "status", "s3://soak/runs/soak/r", "--json"],
        env=env,
        capture_output=True,
        text=True,
    )
    s = json.loads(out.stdout)
    rec = sorted(f["recovery_s"] for f in s["faults"] if f.get("recovery_s") is not None)
    report = {}
    try:
        import fsspec

        with fsspec.open("s3://soak/runs/soak/r/chaos_report.json") as f:
            report = json.load(f)
    except Exception:
        pass

    by_kind: dict[str, dict] = {}  # where the lost time went, by what the supervisor saw
    for f in s["faults"]:
        k = by_kind.setdefault(f["kind"], {"faults": 0, "recovery_s": 0.0})
        k["faults"] += 1
        k["recovery_s"] = round(k["recovery_s"] + (f.get("recovery_s") or 0.0), 2)

    def pct(q):
        return round(rec[min(len(rec) - 1, int(q * len(rec)))], 2) if rec else None

    return {
        "state": s["state"],
        "reason": s["reason"],
        "step": s["step"],
        "faults": len(s["faults"]),
        "recovered": sum(1 for f in s["faults"] if f["recovered_at"]),
        "injected": report.get("totals", {}).get("faults"),
        "recovery_p50": pct(0.5),
        "recovery_p95": pct(0.95),
        "recovery_max": pct(1.0),
        "goodput": report.get("goodput") or s.get("goodput"),  # no chaos: no chaos report
        "by_kind": by_kind,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--mtbf", default="60s")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", dest="json_out")
    ap.add_argument("--keep", metavar="DIR", help="copy the run directory here at the end")
    ap.add_argument("--serve", nargs=2, metavar=("PORT", "LOG"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        return serve(int(args.serve[0]), args.serve[1])
    work = tempfile.mkdtemp(prefix="soak-", dir=os.environ.get("BENCH_DIR"))
    port, log = free_port(), f"{work}/s3.log"
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "x",
        "AWS_DEFAULT_REGION": "us-east-1",
        "FSSPEC_S3": json.dumps({"client_kwargs": {"endpoint_url": endpoint}}),
    }
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(port), log],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.environ.update(env)  # this process's own S3 calls (bucket, listing) use the same endpoint
    try:
        import boto3

        for _ in range(300):  # moto's server takes a while to import
            try:
                boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="soak")
                break
            except Exception:
                time.sleep(0.2)
        else:
            raise SystemExit("the S3 server did not start")
        write_job(work, port)
        rc, rss, wall = run(args, work, env)
        result = report(rc, rss, wall, log, endpoint, work, env)
        if args.keep:  # the run directory, for what reads one (bench/dashboard_load.py)
            import fsspec

            fsspec.filesystem("s3").get("soak/runs/soak/r", args.keep, recursive=True)
    finally:
        server.terminate()
    print_result(result)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)


def report(rc, rss, wall, log, endpoint, work, env) -> dict:
    hours = wall / HOUR
    st = storage(log, hours)
    objs = objects(endpoint)
    journal_stored = objs.get("journal", {}).get("bytes", 0)
    settled = [(t, m) for t, m, _ in rss if t >= 60]  # after the start-up imports
    agents = [(t, a) for t, _, a in rss if t >= 60 and a]
    return {
        "wall_s": round(wall),
        "exit_code": rc,
        **faults(work, env),
        "storage": st,
        "objects": objs,
        "journal_bytes_stored": journal_stored,
        "journal_upload_ratio": round(st["journal_bytes_uploaded"] / journal_stored, 2)
        if journal_stored
        else None,
        "driver_rss_mb": rss_summary(settled),
        "agents_rss_mb": rss_summary(agents),
    }


def rss_summary(settled: list[tuple[float, float]]) -> dict:
    """The driver's RSS after its first minute, and its growth: MiB per hour between the second
    quarter of the run and the last (a leak shows as a steady positive slope)."""
    if not settled:
        return {}
    mem = [m for _, m in settled]
    growth = None
    if len(settled) >= 4:  # a quarter needs a sample at least
        q = len(settled) // 4
        (t1, m1), (t2, m2) = (
            (statistics.mean(x) for x in zip(*part, strict=True))
            for part in (settled[q : 2 * q], settled[-q:])
        )
        growth = round((m2 - m1) / max(t2 - t1, 1.0) * HOUR, 1)
    return {
        "at_1min": round(mem[0]),
        "last": round(mem[-1]),
        "max": round(max(mem)),
        "median": round(statistics.median(mem)),
        "growth_mib_per_hour": growth,
        "samples": [(round(t), round(m)) for t, m in settled[::6]],  # one a minute
    }


def print_result(r: dict) -> None:
    st = r["storage"]
    print(
        f"soak: {r['wall_s']} s, exit {r['exit_code']}, {r['state']} at step {r['step']} "
        f"({r['reason']})"
    )
    print(
        f"faults: {r['faults']} acted on, {r['recovered']} recovered ({r['injected']} injected); "
        f"recovery p50 {r['recovery_p50']} s, p95 {r['recovery_p95']} s, max "
        f"{r['recovery_max']} s; goodput {r['goodput']}; by kind {r['by_kind']}"
    )
    print(
        f"storage: {st['requests_per_hour']:,} requests/h ({24 * st['requests_per_hour']:,}/day), "
        f"{st['bytes_uploaded_per_hour'] / 2**20:.1f} MiB/h uploaded "
        f"({24 * st['bytes_uploaded_per_hour'] / 2**30:.2f} GiB/day); by method {st['by_method']}"
    )
    print(
        f"journal: {r['journal_bytes_stored']:,} B stored, {st['journal_bytes_uploaded']:,} B "
        f"uploaded (x{r['journal_upload_ratio']})"
    )
    print(
        "objects at the end: "
        + ", ".join(
            f"{k} {v['objects']} ({v['bytes'] / 2**20:.1f} MiB)"
            for k, v in sorted(r["objects"].items())
        )
    )
    for who, key in (("driver", "driver_rss_mb"), ("node agents", "agents_rss_mb")):
        m = r[key]
        print(
            f"{who} RSS: {m.get('at_1min')} MiB after a minute, {m.get('last')} at the end, max "
            f"{m.get('max')}; growth {m.get('growth_mib_per_hour')} MiB/h (2nd quarter -> last)"
        )


if __name__ == "__main__":
    main()
