"""An OTLP/HTTP trace receiver on loopback, for tests: what an OpenTelemetry collector's `otlp` receiver takes on
its HTTP port (POST /v1/traces), in both encodings the protocol has: binary protobuf (the Python SDK's exporter)
and JSON (Triton 2.51's exporter sends nothing else; OTLP's JSON writes trace and span ids in hex)."""

from __future__ import annotations

import base64
import http.server
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


@dataclass(frozen=True)
class ReceivedSpan:
    service: str  # its resource's service.name
    resource: dict[str, str]
    name: str
    trace_id: str  # hex
    span_id: str
    parent_span_id: str  # "" for a root span
    kind: int  # OTLP's SpanKind: 2 server, 3 client
    attributes: dict[str, object] = field(hash=False)
    events: tuple[str, ...]
    encoding: str  # "protobuf" or "json": how it arrived


def _value(value) -> object:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


def _from_json(body: bytes) -> ExportTraceServiceRequest:
    """OTLP/JSON -> the protobuf message; its ids are hex, where protobuf's JSON mapping has base64."""
    document = json.loads(body)
    for resource_spans in document.get("resourceSpans", []):
        for scope_spans in resource_spans.get("scopeSpans", []):
            for span in scope_spans.get("spans", []):
                for key in ("traceId", "spanId", "parentSpanId"):
                    if span.get(key):
                        span[key] = base64.b64encode(bytes.fromhex(span[key])).decode()
    return json_format.ParseDict(document, ExportTraceServiceRequest(), ignore_unknown_fields=True)


class OtlpReceiver:
    """Started on a free loopback port; `endpoint` is the base URL (OTEL_EXPORTER_OTLP_ENDPOINT). Use as a context
    manager, or call close()."""

    def __init__(self):
        self.spans: list[ReceivedSpan] = []
        self.requests: list[tuple[str, str]] = []  # (path, content type) of every POST
        self._lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                content_type = self.headers.get("Content-Type", "")
                with receiver._lock:
                    receiver.requests.append((self.path, content_type))
                if self.path != "/v1/traces":
                    self.send_error(404)
                    return
                try:
                    if content_type.startswith("application/json"):
                        message, encoding = _from_json(body), "json"
                    else:
                        message, encoding = ExportTraceServiceRequest.FromString(body), "protobuf"
                except Exception:  # noqa: BLE001 - a receiver answers what it cannot read with 400
                    self.send_error(400)
                    return
                receiver._add(message, encoding)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _add(self, message: ExportTraceServiceRequest, encoding: str) -> None:
        received = []
        for resource_spans in message.resource_spans:
            resource = {a.key: str(_value(a.value)) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(ReceivedSpan(
                        service=resource.get("service.name", ""), resource=resource, name=span.name,
                        trace_id=span.trace_id.hex(), span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(), kind=span.kind,
                        attributes={a.key: _value(a.value) for a in span.attributes},
                        events=tuple(e.name for e in span.events), encoding=encoding))
        with self._lock:
            self.spans.extend(received)

    def wait_for(self, done: Callable[[list[ReceivedSpan]], bool], timeout: float = 60) -> list[ReceivedSpan]:
        """The spans received once `done(spans)` holds; AssertionError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                spans = list(self.spans)
            if done(spans):
                return spans
            if time.monotonic() > deadline:
                raise AssertionError(f"spans received in {timeout:.0f} s: {[(s.service, s.name) for s in spans]}")
            time.sleep(0.1)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> OtlpReceiver:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
