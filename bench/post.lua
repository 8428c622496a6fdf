-- wrk script: POST a JSON body (BENCH_BODY) with an optional Host (BENCH_HOST); done() prints
-- one line "BENCH_JSON {...}" with counts and latency percentiles in microseconds.
wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY")
wrk.headers["Content-Type"] = "application/json"
local host = os.getenv("BENCH_HOST")
if host ~= nil and host ~= "" then
  wrk.headers["Host"] = host
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_s":%.6f,"bytes":%d,"non2xx":%d,"errors":%d,' ..
    '"p50_ms":%.4f,"p90_ms":%.4f,"p99_ms":%.4f,"max_ms":%.4f,"mean_ms":%.4f}\n',
    summary.requests, summary.duration / 1e6, summary.bytes, e.status,
    e.connect + e.read + e.write + e.timeout,
    latency:percentile(50) / 1e3, latency:percentile(90) / 1e3, latency:percentile(99) / 1e3,
    latency.max / 1e3, latency.mean / 1e3))
end
