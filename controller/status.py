"""Status conditions with Kubernetes semantics: lastTransitionTime moves only when status does."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from protos.logs import utc_timestamp


def now() -> str:
    return utc_timestamp()  # conditions and Events carry a (whole-second) Time


def condition(type_: str, status: bool | None, reason: str, message: str, generation: int) -> dict[str, Any]:
    """A condition; status None is "Unknown": the controller could not tell (never a guess)."""
    return {
        "type": type_,
        "status": "Unknown" if status is None else "True" if status else "False",
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
    }


def merge_conditions(
    old: Sequence[Mapping[str, Any]] | None, new: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    previous = {c.get("type"): c for c in old or ()}
    out = []
    for c in new:
        before = previous.get(c["type"])
        if before and before.get("status") == c["status"] and before.get("lastTransitionTime"):
            c = {**c, "lastTransitionTime": before["lastTransitionTime"]}
        else:
            c = {**c, "lastTransitionTime": now()}
        out.append(c)
    return out


def same_status(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    return dict(old or {}) == dict(new)
