-- KEYS[1]: the producer's throttle key; KEYS[2]: a user's quota log (may be empty).
-- ARGV: limit, window ms, quota window ms. Returns
-- {allowed, remaining, reset ms, retry-after ms, quota used (-1 when not asked)}.
-- (``POST /api/v1/events`` counts its request inside the accept script instead: the same
-- ``gcra`` function, in the same round trip as the event is stored.)
local allowed, remaining, reset, retry, now = gcra(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]))
local used = -1
if KEYS[2] ~= '' then
  used = redis.call('ZCOUNT', KEYS[2], now - tonumber(ARGV[3]), '+inf')
end
return {allowed, remaining, reset, retry, used}
