"""The dashboard server: FastAPI, the page, Plotly's own bundled script, and the JSON API.

Contract: `make_app(rundirs, token, host, allow_hosts)` serves `/` (the page),
`/static/plotly.min.js` (from the installed plotly package: the page works offline), `/api/runs`
(the runs it shows: one, or several to compare), and per run (`?run=N`, default 0) `/api/state`,
`/api/timeline`, `/api/metrics`, `/api/events`, `/api/checkpoints`, `/api/cluster`,
`/api/fault/{i}`; `/api/compare` (every run's loss by step and lost time). Every request's Host
header must name the bound address (`resilient.hostcheck`, or one of `allow_hosts`): 400
otherwise. With a token every request must carry it (`?token=`, `Authorization: Bearer`, or the
cookie the page sets). `serve()` binds 127.0.0.1 unless told otherwise, and refuses another
address without a token.
"""

from __future__ import annotations

import hmac
import os
import socket
import threading
from importlib import resources

import plotly
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

from resilient import hostcheck
from resilient.dashboard import curves, data
from resilient.dashboard.reader import RunReader
from resilient.errors import UserError
from resilient.rundir import RunDir

TOKEN_ENV = "RESILIENT_DASHBOARD_TOKEN"
PLOTLY_JS = os.path.join(os.path.dirname(plotly.__file__), "package_data", "plotly.min.js")


def make_app(
    rundirs: RunDir | list[RunDir],
    token: str | None = None,
    host: str = "127.0.0.1",
    allow_hosts: tuple[str, ...] = (),
) -> FastAPI:
    runs = rundirs if isinstance(rundirs, list) else [rundirs]
    readers = [RunReader(rd) for rd in runs]  # shared by every request: each byte read once
    app = FastAPI(title="resilient dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    page = resources.files("resilient.dashboard").joinpath("page.html").read_text()
    _guard(app, hostcheck.allowed(host, allow_hosts), token)

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/static/plotly.min.js")
    def plotly_js() -> FileResponse:
        return FileResponse(PLOTLY_JS, media_type="application/javascript")

    _api(app, readers)
    return app


def _guard(app: FastAPI, names: frozenset[str], token: str | None) -> None:
    """Every request: a Host header naming this server (400), and the token where there is one
    (401); a request that brought the token in its URL gets it as a cookie."""

    @app.middleware("http")
    async def require_host_and_token(request: Request, call_next):
        refused = hostcheck.check(request.headers.get("host"), names)
        if refused:
            return JSONResponse({"error": refused}, status_code=400)
        if token:
            given = (
                request.query_params.get("token")
                or request.cookies.get("resilient_token")
                or request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            )
            if not given or not hmac.compare_digest(given, token):
                return JSONResponse(
                    {"error": "a token is required: open the URL printed with the dashboard"},
                    status_code=401,
                )
        response = await call_next(request)
        if token and request.query_params.get("token"):
            response.set_cookie("resilient_token", token, httponly=True, samesite="strict")
        return response


def _api(app: FastAPI, readers: list[RunReader]) -> None:
    """The JSON API: the runs, their comparison, and each run's views (`?run=N`)."""

    def reader(run: int) -> RunReader:
        if not 0 <= run < len(readers):
            raise HTTPException(404, f"run {run}: this dashboard shows runs 0..{len(readers) - 1}")
        return readers[run]

    @app.get("/api/runs")
    def api_runs() -> list:
        return [data.run_info(i, rd) for i, rd in enumerate(readers)]

    @app.get("/api/compare")
    def api_compare() -> list:
        return [data.compare(rd) for rd in readers]

    @app.get("/api/state")
    def api_state(run: int = 0) -> dict:
        return data.state(reader(run))

    @app.get("/api/timeline")
    def api_timeline(run: int = 0) -> dict:
        return data.timeline(reader(run))

    @app.get("/api/metrics")
    def api_metrics(
        run: int = 0, last: int = curves.MAX_POINTS, cursor: str | None = None, ranks: str = "auto"
    ) -> dict:
        return curves.metrics(reader(run), last, cursor, ranks)

    @app.get("/api/events")
    def api_events(run: int = 0, kind: str | None = None) -> list:
        return data.events(reader(run), kind)

    @app.get("/api/checkpoints")
    def api_checkpoints(run: int = 0) -> list:
        return data.checkpoints(reader(run))

    @app.get("/api/cluster")
    def api_cluster(run: int = 0) -> list:
        return data.cluster(reader(run))

    @app.get("/api/fault/{index}")
    def api_fault(index: int, run: int = 0) -> dict:
        found = data.fault(reader(run), index)
        if found is None:
            raise HTTPException(404, f"fault {index}: the run has no such fault")
        return found


def check_bind(host: str, token: str | None) -> None:
    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        raise UserError(
            f"--host {host} exposes the dashboard beyond this machine: pass --token (or set "
            f"{TOKEN_ENV}) so that every request must carry it"
        )


DEFAULT_PORT = 8266  # not Ray's dashboard's 8265: both serve on a head node


def pick_port(host: str, port: int | None) -> int:
    """`port` when given (UserError when it is taken); otherwise DEFAULT_PORT or the next free
    port after it, so a second dashboard (or Ray's) never makes this one fail."""
    candidates = [port] if port else range(DEFAULT_PORT, DEFAULT_PORT + 50)
    for p in candidates:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            try:
                s.bind((host, p))
                return p
            except OSError as e:
                why = e.strerror or str(e)
    raise UserError(
        f"--port {port or DEFAULT_PORT}: cannot serve on {host} ({why}); give a free port"
    )


def url(host: str, port: int, token: str | None) -> str:
    return f"http://{host}:{port}/" + (f"?token={token}" if token else "")


def serve(
    rd: RunDir | list[RunDir],
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    token: str | None = None,
    background: bool = False,
    allow_hosts: tuple[str, ...] = (),
) -> uvicorn.Server:
    """Run the server (in a daemon thread when `background`)."""
    check_bind(host, token)
    app = make_app(rd, token, host, allow_hosts)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    if background:
        threading.Thread(target=server.run, daemon=True, name="dashboard").start()
    else:
        server.run()
    return server
