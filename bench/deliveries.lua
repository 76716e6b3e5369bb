-- wrk script: POST pre-signed GitHub deliveries to /webhook, one record after another.
--
-- Usage: wrk -s bench/deliveries.lua URL -- <records prefix> <run tag>
-- Thread N reads "<records prefix>.N" (written by bench/payloads.py), records of
-- "<event> <signature> <length>\n<body>". The signature covers the body only, so
-- X-GitHub-Delivery is made unique here (run tag, thread, counter); when a thread
-- runs out of records it starts over, and `resent` counts those no-op re-applies.
-- done() prints one line "WRK_JSON {...}" with latency percentiles and statuses.

local threads = {}

-- BENCH_THINK_MS: a pause before each request on a connection, to measure
-- latency at a lower load than the service's maximum (closed loop otherwise).
local think_ms = tonumber(os.getenv("BENCH_THINK_MS") or "")
if think_ms and think_ms > 0 then
   function delay()
      return think_ms
   end
end

function setup(thread)
   table.insert(threads, thread)
   thread:set("id", #threads)
end

function init(args)
   local prefix, tag = args[1], args[2] or "bench"
   records = assert(io.open(prefix .. "." .. id, "rb"))
   counter = 0
   resent = 0
   wrapped = false
   non2xx = 0
   statuses = {}
   delivery_prefix = tag .. "-" .. id .. "-"
end

local function next_record()
   local line = records:read("*l")
   if line == nil then
      records:seek("set", 0)
      wrapped = true
      line = assert(records:read("*l"), "empty records file")
   end
   local event, signature, length = line:match("^(%S+) (%S+) (%d+)$")
   return event, signature, records:read(tonumber(length))
end

function request()
   local event, signature, body = next_record()
   counter = counter + 1
   if wrapped then
      resent = resent + 1
   end
   local headers = {
      ["Content-Type"] = "application/json",
      ["User-Agent"] = "GitHub-Hookshot/bench",
      ["X-GitHub-Event"] = event,
      ["X-GitHub-Delivery"] = delivery_prefix .. counter,
      ["X-GitHub-Hook-ID"] = "1",
      ["X-Hub-Signature-256"] = signature,
   }
   return wrk.format("POST", "/webhook", headers, body)
end

function response(status, headers, body)
   if status < 200 or status > 299 then
      non2xx = non2xx + 1
   end
   statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
   local non2xx_total, resent_total, sent_total = 0, 0, 0
   local by_status = {}
   for _, thread in ipairs(threads) do
      non2xx_total = non2xx_total + thread:get("non2xx")
      resent_total = resent_total + thread:get("resent")
      sent_total = sent_total + thread:get("counter")
      for status, n in pairs(thread:get("statuses")) do
         by_status[status] = (by_status[status] or 0) + n
      end
   end
   local parts = {}
   for status, n in pairs(by_status) do
      table.insert(parts, string.format('"%d": %d', status, n))
   end
   local e = summary.errors
   io.write(string.format(
      'WRK_JSON {"requests": %d, "duration_us": %d, "sent": %d, "resent": %d, "non_2xx": %d, '
         .. '"statuses": {%s}, "errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, '
         .. '"latency_us": {"p50": %d, "p90": %d, "p99": %d, "p999": %d, "max": %d, "mean": %.1f}}\n',
      summary.requests, summary.duration, sent_total, resent_total, non2xx_total,
      table.concat(parts, ", "), e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
      latency.max, latency.mean))
end
