"""An S3 endpoint (moto) that logs every request as `METHOD PATH BYTES CLIENT_IP`, one a line.
Usage: python s3server.py PORT LOGFILE HOST (runs until killed)."""

import sys

from moto.server import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server

port, log, host = int(sys.argv[1]), open(sys.argv[2], "a", buffering=1), sys.argv[3]  # noqa: SIM115
app = DomainDispatcherApplication(create_backend_app)


def logged(environ, start_response):
    size = environ.get("CONTENT_LENGTH") or 0
    addr = environ.get("REMOTE_ADDR", "-")
    log.write(f"{environ['REQUEST_METHOD']} {environ.get('PATH_INFO', '')} {size} {addr}\n")
    return app(environ, start_response)


make_server(host, port, logged, threaded=True).serve_forever()
