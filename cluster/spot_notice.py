"""The cloud's preemption notice: ask the instance metadata service whether this machine goes away.

A spot/preemptible instance is told ahead of time: AWS about two minutes before, GCP
about 30 s, Azure at least 30 s. A SIGTERM comes later or never (AWS stops or
terminates; GCP sends an ACPI shutdown that becomes SIGTERM). Each provider has its
own protocol; all three answer on a link-local address that exists only on that
cloud, with a header that proves the request came from inside the instance:

- AWS (IMDSv2): ``PUT /latest/api/token`` with ``X-aws-ec2-metadata-token-ttl-seconds``
  gives a token; ``GET /latest/meta-data/spot/instance-action`` with
  ``X-aws-ec2-metadata-token`` is 404 until a notice, then
  ``{"action": "terminate"|"stop"|"hibernate", "time": "2026-12-04T17:02:00Z"}``.
- GCP: ``GET /computeMetadata/v1/instance/preempted`` with ``Metadata-Flavor: Google``
  is ``FALSE`` until the instance is being preempted, then ``TRUE``;
  ``?wait_for_change=true`` holds the request until the value changes (a long poll).
  There is no deadline in the answer: the shutdown follows in about 30 s.
- Azure (Scheduled Events): ``GET /metadata/scheduledevents?api-version=2020-07-01``
  with ``Metadata: true`` lists events; one of ``EventType`` ``Preempt`` naming this
  VM in ``Resources`` is the notice, ``NotBefore`` (RFC 1123) its deadline. A POST of
  ``{"StartRequests": [{"EventId": ...}]}`` acknowledges it: the VM may go at once.

Nothing here sleeps or retries: :class:`~paddlerun.launcher.spot_watch.SpotWatch`
polls on its own thread. Paddle-free and stdlib-only (``urllib``).
"""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from datetime import datetime
from pathlib import Path
from typing import Dict, Optional

PROVIDERS = ("aws", "gcp", "azure")
#: ``supervisor.spot_notice`` values.
CHOICES = ("auto", "none") + PROVIDERS

DEFAULT_ENDPOINTS = {
    "aws": "http://169.254.169.254",
    "gcp": "http://metadata.google.internal",
    "azure": "http://169.254.169.254",
}
#: GCP gives no deadline; its documented shutdown follows the notice in about 30 s.
GCP_NOTICE_S = 30.0
#: A request to the metadata service: it answers in milliseconds on the instance.
REQUEST_TIMEOUT_S = 2.0
#: Azure's asset tag, the same on every Azure VM (what cloud-init checks too).
AZURE_ASSET_TAG = "7783-7084-3265-9085-8269-3286-77"


class MetadataError(RuntimeError):
    """The metadata service could not be asked or gave an answer that is not the protocol's."""


@dataclass(frozen=True)
class Notice:
    """The cloud said this machine goes away at ``deadline`` (unix time)."""
    provider: str
    action: str
    deadline: float
    #: Azure's EventId (acknowledged once the snapshot is durable); None elsewhere.
    event_id: Optional[str] = None
    raw: Dict = field(default_factory=dict, compare=False)


# ---------------------------------------------------------------- which cloud

def detect_provider(dmi_dir: Path = Path("/sys/class/dmi/id")) -> Optional[str]:
    """The cloud this machine runs on, from its firmware's DMI strings; None elsewhere.

    Reads a few small files and sends nothing over the network, so ``spot_notice: auto``
    costs nothing off a cloud (where the metadata address would only time out).
    """
    def read(name: str) -> str:
        try:
            return (dmi_dir / name).read_text(errors="replace").strip()
        except OSError:
            return ""

    vendor, product, bios = read("sys_vendor"), read("product_name"), read("bios_vendor")
    if vendor == "Amazon EC2" or "amazon" in bios.lower():
        return "aws"
    if vendor == "Google" or product == "Google Compute Engine":
        return "gcp"
    if vendor == "Microsoft Corporation" and read("chassis_asset_tag") == AZURE_ASSET_TAG:
        return "azure"
    return None


# ---------------------------------------------------------------- HTTP

def _request(url: str, headers: Dict[str, str], method: str = "GET", body: Optional[bytes] = None,
             timeout: float = REQUEST_TIMEOUT_S) -> Optional[bytes]:
    """The body of a 2xx answer; None for a 404 (AWS: no notice yet); MetadataError otherwise."""
    request = urllib.request.Request(url, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.read()
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise MetadataError(f"{method} {url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise MetadataError(f"{method} {url}: {getattr(e, 'reason', e)}") from None


def _json(data: bytes, url: str) -> Dict:
    try:
        value = json.loads(data)
    except ValueError:
        raise MetadataError(f"{url}: not JSON: {data[:200]!r}") from None
    if not isinstance(value, dict):
        raise MetadataError(f"{url}: expected a JSON object, got {data[:200]!r}")
    return value


# ---------------------------------------------------------------- providers

class AwsNotice:
    """IMDSv2: a session token, renewed before it expires, then the instance-action document."""
    TOKEN_TTL_S = 21600

    def __init__(self, endpoint: str):
        self.base = endpoint.rstrip("/")
        self._token: Optional[str] = None
        self._token_until = 0.0

    def _headers(self) -> Dict[str, str]:
        if self._token is None or time.time() > self._token_until:
            url = f"{self.base}/latest/api/token"
            token = _request(url, {"X-aws-ec2-metadata-token-ttl-seconds": str(self.TOKEN_TTL_S)},
                             method="PUT")
            if not token:
                raise MetadataError(f"PUT {url}: no token in the answer")
            self._token = token.decode().strip()
            self._token_until = time.time() + self.TOKEN_TTL_S / 2
        return {"X-aws-ec2-metadata-token": self._token}

    def poll(self, wait_s: float = 0.0) -> Optional[Notice]:
        url = f"{self.base}/latest/meta-data/spot/instance-action"
        try:
            data = _request(url, self._headers())
        except MetadataError as e:
            if "HTTP 401" in str(e):  # the token expired early (instance stop/start): renew once
                self._token = None
                data = _request(url, self._headers())
            else:
                raise
        if data is None:
            return None
        doc = _json(data, url)
        try:
            deadline = datetime.fromisoformat(str(doc["time"]).replace("Z", "+00:00")).timestamp()
        except (KeyError, ValueError):
            raise MetadataError(f"{url}: no valid 'time' in {doc}") from None
        return Notice("aws", str(doc.get("action", "terminate")), deadline, raw=doc)

    def acknowledge(self, notice: Notice) -> None:
        """AWS has nothing to acknowledge."""


class GcpNotice:
    """``instance/preempted``: FALSE, then TRUE; polled as a long poll of at most ``wait_s``."""

    def __init__(self, endpoint: str):
        self.base = endpoint.rstrip("/")

    def poll(self, wait_s: float = 0.0) -> Optional[Notice]:
        url = f"{self.base}/computeMetadata/v1/instance/preempted"
        timeout = REQUEST_TIMEOUT_S
        if wait_s >= 1:
            url += f"?wait_for_change=true&timeout_sec={int(wait_s)}"
            timeout += int(wait_s)
        data = _request(url, {"Metadata-Flavor": "Google"}, timeout=timeout)
        value = (data or b"").decode(errors="replace").strip().upper()
        if value not in ("TRUE", "FALSE"):
            raise MetadataError(f"{url}: expected TRUE or FALSE, got {value[:200]!r}")
        if value == "FALSE":
            return None
        return Notice("gcp", "preempt", time.time() + GCP_NOTICE_S, raw={"preempted": "TRUE"})

    def acknowledge(self, notice: Notice) -> None:
        """GCP has nothing to acknowledge."""


class AzureNotice:
    """Scheduled Events: a ``Preempt`` event naming this VM; acknowledged once saved."""
    API = "api-version=2020-07-01"

    def __init__(self, endpoint: str):
        self.base = endpoint.rstrip("/")
        self._vm_name: Optional[str] = None

    def _name(self) -> Optional[str]:
        """This VM's name, to pick its events out of its availability set's; None if unknown."""
        if self._vm_name is None:
            url = f"{self.base}/metadata/instance/compute/name?api-version=2020-09-01&format=text"
            try:
                self._vm_name = (_request(url, {"Metadata": "true"}) or b"").decode().strip()
            except MetadataError:
                return None
        return self._vm_name or None

    def poll(self, wait_s: float = 0.0) -> Optional[Notice]:
        url = f"{self.base}/metadata/scheduledevents?{self.API}"
        data = _request(url, {"Metadata": "true"})
        doc = _json(data or b"{}", url)
        events = doc.get("Events", [])
        if not isinstance(events, list):
            raise MetadataError(f"{url}: 'Events' is not a list: {events!r}")
        name = self._name()
        for event in events:
            if not isinstance(event, dict) or event.get("EventType") != "Preempt":
                continue
            resources = event.get("Resources") or []
            if name and resources and name not in resources:
                continue  # another VM of the same availability set
            try:
                deadline = parsedate_to_datetime(event["NotBefore"]).timestamp()
            except (KeyError, TypeError, ValueError):
                deadline = time.time() + GCP_NOTICE_S  # Azure promises at least 30 s
            return Notice("azure", "preempt", deadline, event_id=str(event.get("EventId")), raw=event)
        return None

    def acknowledge(self, notice: Notice) -> None:
        """Tell Azure the VM may go now (saves the rest of the notice period)."""
        url = f"{self.base}/metadata/scheduledevents?{self.API}"
        body = json.dumps({"StartRequests": [{"EventId": notice.event_id}]}).encode()
        _request(url, {"Metadata": "true", "Content-Type": "application/json"}, method="POST",
                 body=body)


def client(provider: str, endpoint: Optional[str] = None):
    """The notice client of ``provider`` (one of :data:`PROVIDERS`) at ``endpoint`` or its default."""
    kinds = {"aws": AwsNotice, "gcp": GcpNotice, "azure": AzureNotice}
    return kinds[provider](endpoint or DEFAULT_ENDPOINTS[provider])
