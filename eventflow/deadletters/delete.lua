-- Delete one dead letter; the event is then kept as long as any finished event. Run a
-- second time (after a lost reply), it finds its answer under the call's key.
-- KEYS: dlq, letter, event, history, audit, audit index, operation.
-- ARGV: id, now ms, audit entry, history entry, retention seconds, operation ttl.
local done = redis.call('GET', KEYS[7])
if done then return tonumber(done) end
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
redis.call('SET', KEYS[7], 1, 'EX', ARGV[6])
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
redis.call('RPUSH', KEYS[5], ARGV[3])
redis.call('ZADD', KEYS[6], ARGV[2], ARGV[1])
redis.call('RPUSH', KEYS[4], ARGV[4])
redis.call('EXPIRE', KEYS[3], ARGV[5])
redis.call('EXPIRE', KEYS[4], ARGV[5])
return 1
