-- The GCRA of the API rate limit (``eventflow/throttle.py`` explains it), as a Lua
-- function shared by the throttle's own script and the accept script (store/accept.lua):
-- ``gcra(key, limit, window ms)`` counts one request unless it is refused and returns
-- allowed (1/0), remaining, reset ms, retry-after ms and Redis's time in ms.
local function gcra(key, limit, window)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
  local interval = window / limit
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  local new_tat = tat + interval
  local allowed, retry = 1, 0
  if new_tat - now > window + 0.001 then
    allowed, retry, new_tat = 0, new_tat - now - window, tat
  else
    redis.call('SET', key, string.format('%.3f', new_tat), 'PX', math.ceil(new_tat - now) + 1)
  end
  local remaining = math.floor((window - (new_tat - now)) / interval + 0.000001)
  return allowed, remaining, math.ceil(new_tat - now), math.ceil(retry), now
end
