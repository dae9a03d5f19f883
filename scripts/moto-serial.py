"""moto's server with one request at a time: the DynamoDB emulator the local stack runs.

`moto_server` handles each connection on its own thread, and moto's DynamoDB backend does not lock
an item while it evaluates a condition and applies an update. Two concurrent
`UpdateItem SET stock = stock - :q` on one item then lose a decrement, and TransactWriteItems
races too - things real DynamoDB never does, and which the fleet's exactly-once tests would
report as the fleet's fault. This launcher serves the same application as `moto_server`
(same request handler, still threaded so keep-alive connections work) behind one lock, so each
request runs alone, as atomically as DynamoDB applies it.

It also makes TransactWriteItems cost what it costs on DynamoDB. moto 5.2.5 deep-copies every
table a transaction touches, to roll back if one of its conditions fails, so each transaction
costs time in proportion to the table (≈9 transactions/s against a table of 2,000 orders). Here
the backup is of the items the transaction names, restored on failure; with one request at a time
that is the same rollback.

    python moto-serial.py --host 127.0.0.1 --port 4569
"""

import argparse
import copy
import signal
import sys
import threading

import moto.dynamodb.models as dynamodb_models
from moto.dynamodb.models import DynamoDBBackend
from moto.dynamodb.models.table import Table
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


class _TablesAreNotCopied:
    """Stands in for the `copy` module inside moto.dynamodb.models: tables are returned as they
    are (only transact_write_items copies whole tables), everything else is copied as before."""

    @staticmethod
    def deepcopy(value, memo=None):
        return value if isinstance(value, Table) else copy.deepcopy(value, memo)


def _item_key(backend, op):
    table = backend.tables.get(op.get("TableName"))
    if table is None:
        return None
    attrs = op.get("Key") or op.get("Item") or {}
    try:
        hash_key, range_key = backend.get_keys_value(table, attrs)
    except Exception:
        return None  # moto reports the malformed request itself
    return table, hash_key, range_key


def _transact_write_items(original):
    def transact(self, transact_items):
        saved = []
        for entry in transact_items:
            op = next(iter(entry.values()), None)
            key = _item_key(self, op) if isinstance(op, dict) else None
            if key is not None:
                table, hash_key, range_key = key
                saved.append((key, copy.deepcopy(table.get_item(hash_key, range_key))))
        try:
            return original(self, transact_items)
        except Exception:
            for (table, hash_key, range_key), item in reversed(saved):
                items = table.items[hash_key] if range_key is not None else table.items
                slot = range_key if range_key is not None else hash_key
                if item is None:
                    items.pop(slot, None)
                else:
                    items[slot] = item
            raise

    return transact


def patch_transactions():
    dynamodb_models.copy = _TablesAreNotCopied
    DynamoDBBackend.transact_write_items = _transact_write_items(
        DynamoDBBackend.transact_write_items
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    patch_transactions()
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
