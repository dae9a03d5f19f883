"""moto's server with one request at a time: the DynamoDB emulator the local stack runs.

`moto_server` handles each connection on its own thread, and moto's DynamoDB backend does not lock
an item while it evaluates a condition and applies an update. Two concurrent
`UpdateItem SET stock = stock - :q` on one item then lose a decrement, and TransactWriteItems
races too - things real DynamoDB never does, and which the fleet's exactly-once tests would
report as the fleet's fault. This launcher serves the same application as `moto_server`
(same request handler, still threaded so keep-alive connections work) behind one lock, so each
request runs alone, as atomically as DynamoDB applies it.

    python moto-serial.py --host 127.0.0.1 --port 4569
"""

import argparse
import signal
import sys
import threading

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import run_simple


def serialized(app):
    lock = threading.Lock()

    def serve(environ, start_response):
        with lock:
            # Drain the body under the lock too: a lazy iterable would run outside it.
            return list(app(environ, start_response))

    return serve


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    app = DomainDispatcherApplication(create_backend_app)
    run_simple(
        args.host,
        args.port,
        serialized(app),
        threaded=True,
        request_handler=MotoRequestHandler,
    )


if __name__ == "__main__":
    main()
