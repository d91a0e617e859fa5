-- Reserve one unit of the user's quota for this event, once: a moving-window log of the
-- event ids that were granted, on Redis's own clock so that every host agrees.
-- Arguments: window ms, limit, event id. Returns {granted, used}.
local function reserve_quota(event, quota, window, limit, event_id)
  if redis.call('HGET', event, 'quota') == '1' then return {1, -1} end
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZREMRANGEBYSCORE', quota, '-inf', now - tonumber(window))
  local used = redis.call('ZCARD', quota)
  if used >= tonumber(limit) then return {0, used} end
  redis.call('ZADD', quota, now, event_id)
  redis.call('PEXPIRE', quota, window)
  redis.call('HSET', event, 'quota', '1')
  return {1, used + 1}
end
