-- A replay refused because the event fails today's schema: the refusal joins the audit
-- trail and the history, and is counted, once even if the call is sent twice (the
-- call's key says it was done). KEYS: audit, audit index, history, stats, operation.
-- ARGV: id, now ms, audit entry, history entry, operation ttl. Returns 1, or 0 if done.
if redis.call('SET', KEYS[5], 1, 'NX', 'EX', ARGV[5]) == false then return 0 end
redis.call('RPUSH', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('RPUSH', KEYS[3], ARGV[4])
redis.call('HINCRBY', KEYS[4], 'replays:invalid', 1)
return 1
