"""Fake instance metadata services of AWS, GCP and Azure on 127.0.0.1, for the spot-notice tests.

Each speaks its provider's protocol as documented, headers included, and refuses what
the real one refuses: AWS (IMDSv2) wants a token from ``PUT /latest/api/token`` sent as
``X-aws-ec2-metadata-token`` (401 without, or with a wrong one), and a TTL header on
the PUT (400 without); GCP wants ``Metadata-Flavor: Google`` (403 without); Azure
wants ``Metadata: true`` (400 without). Until :meth:`MetadataServer.give_notice` the
answer is "no notice" (AWS 404, GCP ``FALSE``, Azure no events); every request is
recorded in :attr:`MetadataServer.requests` (header names in lower case).
"""
from __future__ import annotations

import json
import threading
import time
from email.utils import formatdate
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import List, Optional
from urllib.parse import parse_qs, urlsplit

AWS_TOKEN = "AQAEAFake-token=="
AZURE_VM = "paddlerun-test-vm"


class MetadataServer:
    """One provider's metadata service, started on a free port of 127.0.0.1."""

    def __init__(self, provider: str):
        self.provider = provider
        self.deadline: Optional[float] = None
        self.requests: List[dict] = []
        self.acknowledged: List[str] = []
        self.event_id = "C7061BAC-AFDC-4513-B24B-AA5F13A16123"
        self.other_vm_event = False  # Azure: a Preempt event of another VM of the set
        self._changed = threading.Condition()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "MetadataServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        with self._changed:
            self._changed.notify_all()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def give_notice(self, in_s: float) -> float:
        """From now on, a notice that the machine goes ``in_s`` seconds from now; its deadline."""
        with self._changed:
            self.deadline = time.time() + in_s
            self._changed.notify_all()
        return self.deadline

    def withdraw(self) -> None:
        with self._changed:
            self.deadline = None
            self._changed.notify_all()

    # ------------------------------------------------------------ per provider

    def answer(self, method: str, path: str, query: dict, headers, body: bytes):
        """(status, content type, body) of one request."""
        self.requests.append({"method": method, "path": path, "query": query,
                              "headers": {k.lower(): v for k, v in headers.items()}, "time": time.time()})
        return getattr(self, f"_{self.provider}")(method, path, query, headers, body)

    def _aws(self, method, path, query, headers, body):
        if path == "/latest/api/token" and method == "PUT":
            if not headers.get("X-aws-ec2-metadata-token-ttl-seconds", "").isdigit():
                return 400, "text/plain", b"Bad Request"
            return 200, "text/plain", AWS_TOKEN.encode()
        if headers.get("X-aws-ec2-metadata-token") != AWS_TOKEN:
            return 401, "text/plain", b"Unauthorized"
        if path == "/latest/meta-data/spot/instance-action" and method == "GET":
            if self.deadline is None:
                return 404, "text/html", b"Not Found"
            when = datetime.fromtimestamp(self.deadline, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            return 200, "application/json", json.dumps({"action": "terminate", "time": when}).encode()
        return 404, "text/html", b"Not Found"

    def _gcp(self, method, path, query, headers, body):
        if headers.get("Metadata-Flavor") != "Google":
            return 403, "text/html", b"Missing Metadata-Flavor:Google header."
        if path != "/computeMetadata/v1/instance/preempted" or method != "GET":
            return 404, "text/html", b"Not Found"
        if query.get("wait_for_change") == ["true"]:
            wait = float(query.get("timeout_sec", ["60"])[0])
            with self._changed:
                self._changed.wait_for(lambda: self.deadline is not None, timeout=wait)
        return 200, "application/text", b"TRUE" if self.deadline is not None else b"FALSE"

    def _azure(self, method, path, query, headers, body):
        if headers.get("Metadata") != "true":
            return 400, "application/json", json.dumps(
                {"error": "Bad request. Required metadata header not specified"}).encode()
        if path == "/metadata/instance/compute/name":
            return 200, "text/plain", AZURE_VM.encode()
        if path != "/metadata/scheduledevents" or query.get("api-version") != ["2020-07-01"]:
            return 404, "application/json", b'{"error": "Not found"}'
        if method == "POST":
            for request in json.loads(body or b"{}").get("StartRequests", []):
                self.acknowledged.append(request["EventId"])
            return 200, "application/json", b""
        events = []
        if self.other_vm_event:
            events.append(self._event("0000-other", ["another-vm"], time.time() + 30))
        if self.deadline is not None:
            events.append(self._event(self.event_id, [AZURE_VM], self.deadline))
        return 200, "application/json", json.dumps(
            {"DocumentIncarnation": len(events), "Events": events}).encode()

    @staticmethod
    def _event(event_id, resources, deadline):
        return {"EventId": event_id, "EventType": "Preempt", "ResourceType": "VirtualMachine",
                "Resources": resources, "EventStatus": "Scheduled",
                "NotBefore": formatdate(deadline, usegmt=True), "Description": "",
                "EventSource": "Platform", "DurationInSeconds": -1}


def _handler(server: MetadataServer):
    class Handler(BaseHTTPRequestHandler):
        def _serve(self):
            parts = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            status, ctype, data = server.answer(self.command, parts.path, parse_qs(parts.query),
                                                self.headers, body)
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_PUT = do_POST = _serve

        def log_message(self, *args):  # quiet: pytest shows what the tests assert
            pass

    return Handler
