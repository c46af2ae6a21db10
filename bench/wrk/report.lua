-- What every run reports: one line of JSON (requests/s, latency percentiles in ms, answers by HTTP status, socket
-- errors, whether a thread ran out of seeded rows) that bench/load.py reads.

local threads = {}

function setup(thread)
   thread:set("thread_index", #threads)
   table.insert(threads, thread)
end

statuses = {}
exhausted = false

function response(status)
   statuses[status] = (statuses[status] or 0) + 1
end

local function counts_json(counts)
   local parts = {}
   for key, count in pairs(counts) do
      table.insert(parts, string.format('"%s": %d', key, count))
   end
   return "{" .. table.concat(parts, ", ") .. "}"
end

function done(summary, latency)
   local answers, ran_out = {}, false
   for _, thread in ipairs(threads) do
      for status, count in pairs(thread:get("statuses")) do
         answers[status] = (answers[status] or 0) + count
      end
      ran_out = ran_out or thread:get("exhausted")
   end
   io.write(string.format(
      '{"requests": %d, "seconds": %.3f, "requests_per_second": %.1f, "p50_ms": %.2f, "p90_ms": %.2f, '
         .. '"p99_ms": %.2f, "max_ms": %.2f, "statuses": %s, "socket_errors": %s, "exhausted": %s}\n',
      summary.requests,
      summary.duration / 1e6,
      summary.requests / summary.duration * 1e6,
      latency:percentile(50) / 1000,
      latency:percentile(90) / 1000,
      latency:percentile(99) / 1000,
      latency.max / 1000,
      counts_json(answers),
      counts_json(summary.errors),
      tostring(ran_out)
   ))
end
