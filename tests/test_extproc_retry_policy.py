"""The ext_proc filter's gRPC retry policy, against what a replica going away does, in Envoy 1.40.

Envoy parses ``retry_on`` leniently: a word it does not know is dropped without a word, so a
config that loads proves nothing. Here each word of the shipped policy
(protos/filter_config.py ``RETRY_ON``) is shown to matter: a real Envoy whose ext_proc cluster
has two hosts, a replica going away in one way (tests/upstreams/going_away.py, or a closed port)
and a real ext_proc, and for each way three copies of the product's filter that differ only in
``retry_on``: the shipped one, the one word meant for that failure alone, and none. Round robin
sends every other stream to the bad host first: with a word that covers the failure every
request succeeds through a retry to the other host; with none, those requests fail closed.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from typing import Any

import pytest

from extproc.dev.envoy_bootstrap import EXTPROC_CLUSTER
from extproc.dev.mock_provider import MockProvider
from extproc.dev.processes import free_port, http_get
from protos.filter_config import FILTER_NAME, RETRY_ON
from tests.harness import Stack, running
from tests.upstreams.going_away import GoingAwayReplicas

pytestmark = pytest.mark.e2e

TEMPLATE = """\
apiVersion: holysheep.ai/v1
kind: HolySheepConfig
metadata: {name: retries, namespace: default}
spec:
  timeout: 5s
  providers:
    - {name: one, baseUrl: "{one}", auth: {env: RETRY_ONE_KEY}}
  routes:
    - {models: ["*"], backends: [{provider: one}]}
"""
KEY = "sk-retry-policy-5521"
# The failure modes a replica going away produces, each with the word meant for it.
MODES = {
    "connect-failure": "connect-failure",
    "refused-stream": "refused-stream",
    "reset": "reset",
    "unavailable": "unavailable",
    "cancelled": "cancelled",
}
POLICIES = ("shipped", "alone", "none")
REQUESTS = 8  # per listener: round robin puts every other first attempt on the bad host


def _retry_on(mode: str, policy: str) -> str:
    return {"shipped": RETRY_ON, "alone": MODES[mode], "none": ""}[policy]


class Rig:
    def __init__(self) -> None:
        self.replicas = GoingAwayReplicas()
        self.closed_port = free_port()  # nobody listens here
        self.listeners: dict[tuple[str, str], int] = {}
        # Plaintext to the ext_proc (insecure): the bad hosts speak bare HTTP/2, and a TLS
        # handshake failure would turn every mode into a connect failure.
        self.stack = Stack(TEMPLATE, {"one": MockProvider("one", expect_key=KEY)}, env={"RETRY_ONE_KEY": KEY},
                           bootstrap_hook=self.amend, insecure=True)

    def bad_port(self, mode: str) -> int:
        return self.closed_port if mode == "connect-failure" else self.replicas.ports[mode]

    def amend(self, boot: dict[str, Any]) -> dict[str, Any]:
        """One cluster (bad host, the real ext_proc) and one listener per failure mode and policy."""
        resources = boot["static_resources"]
        (extproc_cluster,) = [c for c in resources["clusters"] if c["name"] == EXTPROC_CLUSTER]
        good = extproc_cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
        entry = resources["listeners"][0]
        for mode in MODES:
            for policy in POLICIES:
                name = f"going-away-{mode}-{policy}"
                cluster = copy.deepcopy(extproc_cluster)
                cluster["name"] = name
                cluster.pop("health_checks")  # the bad host stays in rotation: only retries can help
                bad = copy.deepcopy(good)
                bad["endpoint"]["address"]["socket_address"]["port_value"] = self.bad_port(mode)
                cluster["load_assignment"] = {"cluster_name": name, "endpoints": [{"lb_endpoints": [bad, good]}]}
                resources["clusters"].append(cluster)
                listener = copy.deepcopy(entry)
                listener["name"] = name
                port = free_port()
                listener["address"]["socket_address"]["port_value"] = port
                hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
                hcm["stat_prefix"] = name
                (ext_proc,) = [f for f in hcm["http_filters"] if f["name"] == FILTER_NAME]
                grpc_service = ext_proc["typed_config"]["grpc_service"]
                grpc_service["envoy_grpc"]["cluster_name"] = name
                grpc_service["retry_policy"]["retry_on"] = _retry_on(mode, policy)
                resources["listeners"].append(listener)
                self.listeners[(mode, policy)] = port
        return boot

    def cluster_stat(self, name: str, stat: str) -> int:
        assert self.stack.envoy is not None
        status, text = http_get(f"{self.stack.envoy.admin}/stats?filter=^cluster\\.{re.escape(name)}\\.{stat}$")
        assert status == 200, text
        found = re.search(rf"^cluster\.{re.escape(name)}\.{stat}: (\d+)$", text, re.M)
        return int(found[1]) if found else 0


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    r = Rig()
    r.replicas.start()
    try:
        with running(r.stack):
            yield r
    finally:
        r.replicas.stop()


@pytest.fixture(scope="module")
def outcomes(rig: Rig) -> dict[tuple[str, str], list[int]]:
    """Status of each request through each listener (sequential, so round robin alternates)."""
    out: dict[tuple[str, str], list[int]] = {}
    for (mode, policy), port in rig.listeners.items():
        with rig.stack.recording_client(f"retry {mode} {policy}", base_url=f"http://127.0.0.1:{port}") as client:
            out[(mode, policy)] = [
                client.post("/v1/chat/completions", json={"model": "m", "messages": [
                    {"role": "user", "content": f"{mode} {policy} {i}"}]}).status_code
                for i in range(REQUESTS)
            ]
    return out


def test_the_shipped_policy_names_each_failure() -> None:
    assert set(RETRY_ON.split(",")) == set(MODES.values())


@pytest.mark.parametrize("mode", list(MODES))
def test_the_shipped_policy_and_the_one_word_retry_it(rig: Rig, outcomes: dict[tuple[str, str], list[int]],
                                                      mode: str) -> None:
    for policy in ("shipped", "alone"):
        name = f"going-away-{mode}-{policy}"
        assert outcomes[(mode, policy)] == [200] * REQUESTS, (policy, outcomes[(mode, policy)])
        retried = rig.cluster_stat(name, "upstream_rq_retry")
        assert retried >= REQUESTS // 2 - 1, (policy, retried)  # the bad host really was tried first
        assert rig.cluster_stat(name, "upstream_rq_retry_overflow") == 0


@pytest.mark.parametrize("mode", list(MODES))
def test_without_the_word_the_request_fails_closed(rig: Rig, outcomes: dict[tuple[str, str], list[int]],
                                                   mode: str) -> None:
    # The control: the same failure, no retry condition: the streams the bad host got fail the
    # request (fail closed, 500), so the passes above come from the word, not from luck.
    statuses = outcomes[(mode, "none")]
    assert statuses.count(500) >= REQUESTS // 2 - 1, statuses
    assert set(statuses) <= {200, 500}
    assert rig.cluster_stat(f"going-away-{mode}-none", "upstream_rq_retry") == 0
    if mode != "connect-failure":
        assert rig.replicas.streams[mode] >= 3 * (REQUESTS // 2 - 1)  # the fault was real, each time
