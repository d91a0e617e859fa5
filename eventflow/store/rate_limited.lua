-- The user's quota is used up: the event ends ``rate_limited``, with its history entry and
-- counter, out of the watch set, kept for the retention time. KEYS: event, history, stats,
-- watch, lease. ARGV: now, last error, history entry, event id, retention seconds.
-- Returns 1, or 0 when it was rate-limited already (a second run: it changes nothing).
if not fenced(KEYS[1], KEYS[2], ARGV[6], ARGV[7]) then return 0 end
if redis.call('HGET', KEYS[1], 'status') == 'rate_limited' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'rate_limited', 'updated_at', ARGV[1], 'claimed', '0',
           'last_error', ARGV[2])
redis.call('HDEL', KEYS[1], 'take')
redis.call('RPUSH', KEYS[2], ARGV[3])
redis.call('HINCRBY', KEYS[3], 'rate_limited', 1)
redis.call('ZREM', KEYS[4], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[5])
redis.call('DEL', KEYS[5])
return 1
