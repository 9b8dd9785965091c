"""etcd through its v3 JSON gateway (the maintained ``etcd3gw`` client), over several endpoints.

Only what membership needs: leases, JSON values, a prefix listing and a compare-and-put.
Every call tries the endpoints in order, starting with the last one that answered, so a
job keeps working while one member of an etcd cluster is down. When none answers the call
raises :class:`EtcdUnavailable`: the caller decides whether that may wait (training goes
on while etcd is away; a change of members waits for it).
"""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

import etcd3gw
from etcd3gw import exceptions as etcd_errors
from etcd3gw.lease import Lease

#: Per request: a down endpoint is given up on after this, and the next one tried.
REQUEST_TIMEOUT_S = 1.0


class EtcdUnavailable(RuntimeError):
    """No endpoint of the etcd cluster answered."""


@dataclass(frozen=True)
class Entry:
    key: str
    value: dict
    #: etcd's revision when the key was created: orders members by when they joined.
    create_revision: int
    mod_revision: int


class Etcd:
    def __init__(self, endpoints: Sequence[Tuple[str, int]], timeout_s: float = REQUEST_TIMEOUT_S):
        self.endpoints = list(endpoints)
        self._clients = [etcd3gw.Etcd3Client(host=h, port=p, timeout=timeout_s, api_path="/v3/")
                         for h, p in self.endpoints]
        self._current = 0

    def describe(self) -> str:
        return ",".join(f"{h}:{p}" for h, p in self.endpoints)

    def _on_any(self, call: Callable[[etcd3gw.Etcd3Client], Any]) -> Any:
        """``call(client)`` on the first endpoint that answers."""
        errors = []
        for i in range(len(self._clients)):
            index = (self._current + i) % len(self._clients)
            client = self._clients[index]
            try:
                result = call(client)
            except (etcd_errors.ConnectionFailedError, etcd_errors.ConnectionTimeoutError,
                    etcd_errors.InternalServerError) as e:
                errors.append(f"{client.host}:{client.port}: {type(e).__name__}")
                continue
            self._current = index
            return result
        raise EtcdUnavailable(f"etcd at {self.describe()} did not answer ({'; '.join(errors)})")

    # ---------------------------------------------------------------- leases

    def grant(self, ttl_s: int) -> int:
        return self._on_any(lambda client: client.lease(ttl_s)).id

    def refresh(self, lease_id: int) -> bool:
        """Keep the lease alive; False when it has expired (its keys are gone)."""
        return self._on_any(lambda client: Lease(lease_id, client).refresh()) > 0

    def revoke(self, lease_id: int) -> None:
        self._on_any(lambda client: Lease(lease_id, client).revoke())

    # ---------------------------------------------------------------- keys

    def put(self, key: str, value: dict, lease_id: Optional[int] = None) -> None:
        payload = {"key": _b64(key), "value": _b64(json.dumps(value, sort_keys=True))}
        if lease_id is not None:
            payload["lease"] = lease_id
        self._post("/kv/put", payload)

    def get(self, key: str) -> Optional[Entry]:
        entries = self._range({"key": _b64(key)})
        return entries[0] if entries else None

    def get_prefix(self, prefix: str) -> List[Entry]:
        return self._range({"key": _b64(prefix), "range_end": _b64(_prefix_end(prefix))})

    def put_if_unchanged(self, key: str, value: dict, mod_revision: int) -> bool:
        """Put ``value`` only if ``key`` was not written since ``mod_revision`` (0: absent)."""
        result = self._post("/kv/txn", {
            "compare": [{"key": _b64(key), "result": "EQUAL", "target": "MOD",
                         "mod_revision": mod_revision}],
            "success": [{"request_put": {"key": _b64(key),
                                         "value": _b64(json.dumps(value, sort_keys=True))}}],
            "failure": []})
        return bool(result.get("succeeded"))

    def delete_prefix(self, prefix: str) -> None:
        self._post("/kv/deleterange", {"key": _b64(prefix), "range_end": _b64(_prefix_end(prefix))})

    def _range(self, payload: dict) -> List[Entry]:
        result = self._post("/kv/range", payload)
        entries = []
        for kv in result.get("kvs", []):
            try:
                value = json.loads(base64.b64decode(kv.get("value", "")))
            except ValueError:
                continue  # not ours: something else wrote under the job's prefix
            if isinstance(value, dict):
                entries.append(Entry(base64.b64decode(kv["key"]).decode(), value,
                                     int(kv.get("create_revision", 0)), int(kv.get("mod_revision", 0))))
        return entries

    def _post(self, path: str, payload: dict) -> dict:
        return self._on_any(lambda client: client.post(client.get_url(path), json=payload))


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _prefix_end(prefix: str) -> str:
    """The range end that makes a range query a prefix query (the prefix, last byte + 1)."""
    raw = prefix.encode()
    return (raw[:-1] + bytes([raw[-1] + 1])).decode()
