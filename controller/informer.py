"""List-then-watch of HolySheepConfigs that only enqueues keys (the reconciler reads state).

A 410 Gone (an HTTP status or an ERROR event: the client raises `Gone` for both) means our
resourceVersion was compacted away: list again. Any other failure: back off and watch again from the last version seen.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from controller.kube import Gone, Kube, Resource

log = logging.getLogger(__name__)


class Informer:
    def __init__(
        self,
        kube: Kube,
        resource: Resource,
        namespace: str | None,
        enqueue: Callable[[str, str], None],
        stop: threading.Event,
        watch_timeout: int = 300,
        backoff: tuple[float, float] = (0.5, 30.0),
    ) -> None:
        self.kube = kube
        self.resource = resource
        self.namespace = namespace
        self.enqueue = enqueue
        self.stop = stop
        self.watch_timeout = watch_timeout
        self.backoff = backoff
        self._keys: set[str] = set()
        self._lock = threading.Lock()
        self.lists = 0  # observable in tests and logs

    def keys(self) -> list[str]:
        with self._lock:
            return sorted(self._keys)

    def _list(self) -> str:
        listing = self.kube.list(self.resource, self.namespace)
        self.lists += 1
        current = {f"{i['metadata']['namespace']}/{i['metadata']['name']}" for i in listing.get("items", [])}
        with self._lock:
            # Keys that vanished while we were not watching still need their cleanup reconcile.
            gone = self._keys - current
            self._keys = current
        for key in sorted(current | gone):
            self.enqueue(key, "list")
        rv = str(listing.get("metadata", {}).get("resourceVersion", ""))
        log.info(
            "listed", extra={"resource": self.resource.plural, "count": len(current), "resourceVersion": rv}
        )
        return rv

    def run(self) -> None:
        rv: str | None = None
        delay = self.backoff[0]
        while not self.stop.is_set():
            try:
                if rv is None:
                    rv = self._list()
                for event in self.kube.watch(self.resource, self.namespace, rv, self.watch_timeout):
                    if self.stop.is_set():
                        return
                    kind, obj = event.get("type"), event.get("object") or {}
                    rv = obj.get("metadata", {}).get("resourceVersion") or rv
                    if kind == "BOOKMARK":
                        continue
                    key = f"{obj['metadata']['namespace']}/{obj['metadata']['name']}"
                    with self._lock:
                        if kind == "DELETED":
                            self._keys.discard(key)
                        else:
                            self._keys.add(key)
                    self.enqueue(key, str(kind).lower())
                delay = self.backoff[0]  # a watch that ends normally is routine
            except Gone:
                log.info("watch expired (410 Gone); listing again", extra={"resourceVersion": rv})
                rv = None
            except Exception as exc:  # connection resets, timeouts, bad JSON: all mean reconnect
                log.warning("watch failed; reconnecting", extra={"error": repr(exc), "delay": delay})
                self.stop.wait(delay)
                delay = min(delay * 2, self.backoff[1])
