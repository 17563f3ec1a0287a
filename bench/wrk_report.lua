-- Shared by every wrk run of the benchmark: the request (from the environment) and a one-line
-- JSON report with exact percentiles (microseconds) that bench/run.sh collects.
--   BENCH_METHOD  GET | POST
--   BENCH_BODY    small | 1MiB | none
--   BENCH_AUTH    the Authorization header the client sends (the real token for "direct",
--                 a placeholder through a proxy, which replaces it; the local key for
--                 "agent_key", the agent with require_key, which checks it and replaces it)
local method = os.getenv("BENCH_METHOD") or "GET"
local body = os.getenv("BENCH_BODY") or "none"
local auth = os.getenv("BENCH_AUTH") or ""

wrk.method = method
if auth ~= "" then
  wrk.headers["Authorization"] = auth
end
if body == "small" then
  wrk.headers["Content-Type"] = "application/json"
  wrk.body = '{"model":"echo-1","messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Say hello in five words."}],"max_tokens":16,"temperature":0}'
elseif body == "1MiB" then
  wrk.headers["Content-Type"] = "application/octet-stream"
  wrk.body = string.rep("x", 1048576)
end

-- No response() hook: it would make wrk hand every response to Lua, and load the generator.
-- wrk counts statuses >= 400 itself (err_status).
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,' ..
    '"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d}\n',
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
