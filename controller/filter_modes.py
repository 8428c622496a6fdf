"""Per-route ext_proc config for the two kinds of provider route.

protos/filter_config.py is shared and has had two shapes: per-mode (`BODY_MODE`,
`HEADERS_MODE`, `ext_proc_per_route(mode)`) and single-mode (`ext_proc_per_route()`). The
controller follows whichever is installed, so the sidecar always asks for what the data plane
expects; the two routes are kept either way, as the POST/bodyless split costs nothing.
"""

from __future__ import annotations

import inspect
from typing import Any

from protos import filter_config as fc

ROUTE_KINDS = ("body", "default")


def per_route_config(kind: str) -> dict[str, Any]:
    per_route: Any = fc.ext_proc_per_route
    if inspect.signature(per_route).parameters:
        mode = fc.BODY_MODE if kind == "body" else fc.HEADERS_MODE
        result: dict[str, Any] = per_route(mode)
    else:
        result = per_route()
    return result
