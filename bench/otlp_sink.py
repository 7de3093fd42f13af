"""A collector stand-in for the benchmarks: an OTLP/HTTP trace receiver on loopback, in a
process of its own (its CPU is not corral's), that decodes every export with
``opentelemetry-proto`` and counts the spans, as a collector would take them.

    python bench/otlp_sink.py PORT_FILE     # serves on a free port, written to PORT_FILE

``GET /count`` answers the spans received so far.
"""

from __future__ import annotations

import gzip
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

_received = 0
_lock = threading.Lock()


class _Handler(BaseHTTPRequestHandler):
    # Connections kept alive between exports, as a collector keeps them.
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        global _received
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        request = ExportTraceServiceRequest.FromString(body)
        spans = sum(len(scope.spans) for rs in request.resource_spans for scope in rs.scope_spans)
        with _lock:
            _received += spans
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        with _lock:
            body = str(_received).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    Path(sys.argv[1]).write_text(str(server.server_address[1]))
    server.serve_forever()


if __name__ == "__main__":
    main()
