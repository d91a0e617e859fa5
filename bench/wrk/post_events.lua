-- POST EventFlow events from wrk: one event per request, or BENCH_BATCH events per request.
-- Every event has its own user_id so that the per-user rate limit never interferes.
-- Configured from the environment: BENCH_PATH, BENCH_API_KEY, BENCH_BATCH, BENCH_MESSAGE.

local path = os.getenv("BENCH_PATH") or "/api/v1/events"
local key = os.getenv("BENCH_API_KEY") or ""
local batch = tonumber(os.getenv("BENCH_BATCH") or "0")
local message = os.getenv("BENCH_MESSAGE") or "Hello"
local run = os.getenv("BENCH_RUN") or "0"

local thread_count = 0
local counter = 0
local prefix = "u"

function setup(thread)
  thread:set("thread_index", thread_count)
  thread_count = thread_count + 1
end

function init(args)
  prefix = string.format("u%s-%d-", run, thread_index or 0)
  wrk.headers["Content-Type"] = "application/json"
  if key ~= "" then
    wrk.headers["Authorization"] = "Bearer " .. key
  end
end

local function event()
  counter = counter + 1
  return string.format(
    '{"user_id":"%s%d","event_type":"USER_NOTIFICATION",' ..
    '"payload":{"to_email":"test@example.com","message":"%s"}}',
    prefix, counter, message)
end

function request()
  local body
  if batch > 0 then
    local events = {}
    for i = 1, batch do
      events[i] = event()
    end
    body = '{"events":[' .. table.concat(events, ",") .. ']}'
  else
    body = event()
  end
  return wrk.format("POST", path, nil, body)
end
