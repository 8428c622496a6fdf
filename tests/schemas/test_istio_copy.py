"""The Istio CRD copy is what its README says: unchanged, Istio 1.30.3, exactly the kinds we use."""

from __future__ import annotations

import hashlib
import re

import yaml

from tests.schemas import ISTIO_CRDS

KINDS = {
    ("networking.istio.io", "ServiceEntry"),
    ("networking.istio.io", "DestinationRule"),
    ("networking.istio.io", "VirtualService"),
    ("networking.istio.io", "EnvoyFilter"),
    ("networking.istio.io", "Gateway"),
    ("security.istio.io", "AuthorizationPolicy"),
    ("security.istio.io", "PeerAuthentication"),
}


def test_the_copy_is_the_one_the_readme_names() -> None:
    readme = (ISTIO_CRDS.parent / "README.md").read_text()
    stated = re.search(r"SHA-256 of the copy: `([0-9a-f]{64})`", readme)
    assert stated, "the README states the copy's SHA-256"
    assert hashlib.sha256(ISTIO_CRDS.read_bytes()).hexdigest() == stated.group(1), (
        "the schemas were edited: copy them again from Istio's file (see the README)"
    )
    assert "1.30.3" in ISTIO_CRDS.name and "Apache License, Version 2.0" in readme


def test_exactly_the_kinds_we_generate_or_ship() -> None:
    docs = [d for d in yaml.safe_load_all(ISTIO_CRDS.read_text()) if d]
    assert all(d["kind"] == "CustomResourceDefinition" for d in docs)
    assert {(d["spec"]["group"], d["spec"]["names"]["kind"]) for d in docs} == KINDS
    assert len(docs) == len(KINDS)
    for doc in docs:
        for version in doc["spec"]["versions"]:
            assert version["schema"]["openAPIV3Schema"]["properties"]["spec"], (doc["metadata"]["name"], version)
