-- Give a stalled event a new task message: one that is unfinished, that no run holds, and
-- that no run has taken for ARGV[2] seconds (its message was lost with a worker killed
-- between popping it and recording it as unacknowledged). A duplicate message is harmless:
-- the claim and the ledger make a second run do nothing. ARGV: id, seconds, message,
-- history entry. Returns what it found: finished, busy, fresh or requeued.
local status = redis.call('HGET', KEYS[1], 'status')
if (not status) or status == 'delivered' or status == 'rate_limited'
    or status == 'dead_lettered' or status == 'suppressed' or status == 'bounced' then
  redis.call('ZREM', KEYS[3], ARGV[1])
  return 'finished'
end
local now = tonumber(redis.call('TIME')[1])
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('ZADD', KEYS[3], now, ARGV[1])
  return 'busy'
end
local seen = tonumber(redis.call('ZSCORE', KEYS[3], ARGV[1]) or 0)
if seen > now - tonumber(ARGV[2]) then return 'fresh' end
redis.call('ZADD', KEYS[3], now, ARGV[1])
redis.call('LPUSH', KEYS[4], ARGV[3])
redis.call('RPUSH', KEYS[5], ARGV[4])
return 'requeued'
