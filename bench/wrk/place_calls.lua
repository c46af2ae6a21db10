-- POST /api/calls for many customers in turn. Arguments: a file with one "api-token agent-id" line per customer,
-- and wrk's thread count; the threads take the customers in turn, so every customer is asked at the same pace.

require("report")

local prepared = {}
local next_customer, step

function init(args)
   for line in io.lines(args[1]) do
      local token, agent = line:match("^(%S+) (%S+)$")
      table.insert(prepared, wrk.format("POST", "/api/calls", {
         ["Authorization"] = "Bearer " .. token,
         ["Content-Type"] = "application/json",
      }, string.format('{"agentId": "%s", "phoneNumber": "+14155550123"}', agent)))
   end
   step = tonumber(args[2])
   next_customer = thread_index
end

function request()
   local prepared_request = prepared[1 + next_customer % #prepared]
   next_customer = next_customer + step
   return prepared_request
end
