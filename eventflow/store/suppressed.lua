-- The address is on the suppression list: the event ends ``suppressed`` without an SMTP
-- attempt (and without a unit of its user's quota: take.lua stopped before reserving it),
-- with its history entry (naming the entry) and counter, out of the watch set, kept for
-- the retention time. KEYS: event, history, stats, watch, lease. ARGV: now, last error,
-- history entry, event id, retention seconds, run token, superseded entry.
-- Returns 1, or 0 when it was suppressed already (a second run: it changes nothing).
if not fenced(KEYS[1], KEYS[2], ARGV[6], ARGV[7]) then return 0 end
if redis.call('HGET', KEYS[1], 'status') == 'suppressed' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'suppressed', 'updated_at', ARGV[1], 'claimed', '0',
           'last_error', ARGV[2])
redis.call('HDEL', KEYS[1], 'take')
redis.call('RPUSH', KEYS[2], ARGV[3])
redis.call('HINCRBY', KEYS[3], 'suppressed', 1)
redis.call('ZREM', KEYS[4], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[5])
redis.call('DEL', KEYS[5])
return 1
