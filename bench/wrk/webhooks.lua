-- Bolna's status webhooks, each one unique: every seeded call gets initiated, ringing, in-progress, then completed
-- with its duration (so it is billed). Arguments: the first seeded call's number, how many calls were seeded for
-- this run, and wrk's thread count; each thread takes its own slice of the calls.
--
-- A thread sends its calls' webhooks in blocks of BLOCK calls: first every call's `initiated`, then every `ringing`,
-- and so on. A call's next status leaves BLOCK requests after the previous one, far more than a thread has
-- connections, so it arrives after it, as Bolna's do, while the calls of a block interleave like concurrent calls.

require("report")

local BLOCK = 64
local STATUSES = { "initiated", "ringing", "in-progress", "completed" }
local TRANSCRIPT = "assistant: Hello! This is Maya calling from Callflow. Is this a good time to talk?\\n"
   .. "user: Yes, go ahead.\\n"
   .. "assistant: I am calling to confirm your appointment for tomorrow at 11 am. Does that still work?\\n"
   .. "user: Yes, that works for me.\\n"
   .. "assistant: Great, you are all set. Thank you and have a nice day!\\n"
-- The execution object the simulator sends (services/bolna_simulator/state.py, Execution.to_json).
local BODY = '{"id": "e0000000-0000-4000-8000-%012d", "agent_id": "3c90c3cc-0d44-4b50-8888-8dd25736052a", '
   .. '"batch_id": null, "status": "%s", "created_at": "%s", "updated_at": "%s", "conversation_duration": %d.0, '
   .. '"total_cost": %s, "cost_breakdown": {"llm": %s, "network": %s, "platform": %s, "synthesizer": %s, '
   .. '"transcriber": %s}, "transcript": %s, "answered_by_voice_mail": false, "error_message": null, '
   .. '"extracted_data": %s, "telephony_data": {"duration": "%d", "to_number": "+14155550123", '
   .. '"from_number": "+918035735888", "recording_url": %s, "hosted_telephony": true, '
   .. '"provider_call_id": "CA%032d", "call_type": "outbound", "provider": "twilio"}, '
   .. '"context_details": {"recipient_data": {"callflow_call_id": "00000000-0000-4000-8000-%012d"}, '
   .. '"recipient_phone_number": "+14155550123"}}'

local first, blocks, sent, now

function init(args)
   local first_call, calls, thread_count = tonumber(args[1]), tonumber(args[2]), tonumber(args[3])
   local per_thread = math.floor(calls / thread_count)
   first = first_call + thread_index * per_thread
   blocks = math.floor(per_thread / BLOCK)
   sent = 0
   now = os.date("!%Y-%m-%dT%H:%M:%S.000000Z")
   wrk.method = "POST"
   wrk.headers["Content-Type"] = "application/json"
end

local function body(call, status)
   if status ~= "completed" then
      return string.format(BODY, call, status, now, now, 0, "0.0", "0.0", "0.0", "0.0", "0.0", "0.0", "null",
         "null", 0, "null", call, call)
   end
   local duration = 20 + call % 580
   local minutes = duration / 60
   return string.format(BODY, call, status, now, now, duration, string.format("%.2f", 8.5 * minutes),
      string.format("%.2f", 1.2 * minutes), string.format("%.2f", 1.5 * minutes),
      string.format("%.2f", 2.0 * minutes), string.format("%.2f", 3.0 * minutes),
      string.format("%.2f", 0.8 * minutes), '"' .. TRANSCRIPT .. '"',
      '{"interested": true, "callback_requested": false}', duration,
      string.format('"https://recordings.bolna-simulator.invalid/CA%032d.mp3"', call), call, call)
end

function request()
   local block, position = math.floor(sent / (4 * BLOCK)), sent % (4 * BLOCK)
   if block >= blocks then
      -- Out of seeded calls: the run is void (bench/load.py fails it), and this thread sends nothing new.
      exhausted = true
      wrk.thread:stop()
      block, position = blocks - 1, 4 * BLOCK - 1
   end
   sent = sent + 1
   local call = first + block * BLOCK + position % BLOCK
   return wrk.format(nil, nil, nil, body(call, STATUSES[1 + math.floor(position / BLOCK)]))
end
