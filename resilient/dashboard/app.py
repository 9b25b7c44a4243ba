"""The dashboard server: FastAPI, the page, Plotly's own bundled script, and the JSON API.

Contract: `make_app(rundir, token)` serves `/` (the page), `/static/plotly.min.js` (from the
installed plotly package: the page works offline), and `/api/state`, `/api/timeline`,
`/api/metrics`, `/api/events`, `/api/checkpoints`. With a token every request must carry it
(`?token=`, `Authorization: Bearer`, or the cookie the page sets). `serve()` binds 127.0.0.1 unless
told otherwise, and refuses another address without a token.
"""

from __future__ import annotations

import hmac
import os
import socket
import threading
from importlib import resources

import plotly
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

from resilient.dashboard import data
from resilient.dashboard.reader import RunReader
from resilient.errors import UserError
from resilient.rundir import RunDir

TOKEN_ENV = "RESILIENT_DASHBOARD_TOKEN"
PLOTLY_JS = os.path.join(os.path.dirname(plotly.__file__), "package_data", "plotly.min.js")


def make_app(rundir: RunDir, token: str | None = None) -> FastAPI:
    rd = RunReader(rundir)  # shared by every request: each byte of the run read once
    app = FastAPI(title="resilient dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    page = resources.files("resilient.dashboard").joinpath("page.html").read_text()

    @app.middleware("http")
    async def require_token(request: Request, call_next):
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

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/static/plotly.min.js")
    def plotly_js() -> FileResponse:
        return FileResponse(PLOTLY_JS, media_type="application/javascript")

    @app.get("/api/state")
    def api_state() -> dict:
        return data.state(rd)

    @app.get("/api/timeline")
    def api_timeline() -> dict:
        return data.timeline(rd)

    @app.get("/api/metrics")
    def api_metrics(last: int = 2000) -> dict:
        return data.metrics(rd, last)

    @app.get("/api/events")
    def api_events(kind: str | None = None) -> list:
        return data.events(rd, kind)

    @app.get("/api/checkpoints")
    def api_checkpoints() -> list:
        return data.checkpoints(rd)

    return app


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
    rd: RunDir,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    token: str | None = None,
    background: bool = False,
) -> uvicorn.Server:
    """Run the server (in a daemon thread when `background`)."""
    check_bind(host, token)
    server = uvicorn.Server(
        uvicorn.Config(make_app(rd, token), host=host, port=port, log_level="warning")
    )
    if background:
        threading.Thread(target=server.run, daemon=True, name="dashboard").start()
    else:
        server.run()
    return server
