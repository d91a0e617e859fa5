-- May a worker POST to a webhook URL now? Atomic, so that two workers never both take the
-- first attempt at a receiver whose speed is not known yet.
-- KEYS: hanging (set when an attempt timed out), in-flight (sorted set: the attempts under
-- way, by start time), fast (set while the receiver answers quickly).
-- ARGV: now (seconds), token, slow seconds, longest attempt seconds, in-flight TTL seconds.
-- Returns 0 (go: the token is noted in flight) or the milliseconds to wait untried.
local now, slow, longest = tonumber(ARGV[1]), tonumber(ARGV[3]), tonumber(ARGV[4])
local hanging = redis.call('PTTL', KEYS[1])
if hanging > 0 then return hanging end
-- Attempts of workers that died mid-POST are forgotten after the longest attempt.
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - longest)
local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
if oldest[1] then
  local age = now - tonumber(oldest[2])
  -- A receiver not known to be quick gets one attempt at a time; a quick one, as many
  -- as come, until one of them has waited longer than a quick answer takes.
  if age > slow or redis.call('EXISTS', KEYS[3]) == 0 then
    return math.max(100, math.floor(slow * 1000))
  end
end
redis.call('ZADD', KEYS[2], now, ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[5])
return 0
