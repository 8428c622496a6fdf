"""Third-party schemas the tests validate against, copied in so the repository is self-contained."""

from __future__ import annotations

from pathlib import Path

ISTIO_CRDS = Path(__file__).resolve().parent / "istio" / "crds-1.30.3.gen.yaml"
