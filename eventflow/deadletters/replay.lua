-- Queue a dead letter again, all at once or not at all. If the event's record is gone
-- it is written again from the dead letter (ARGV[8..]: field/value pairs). The call's
-- key (KEYS[12], named by the task id) keeps its answer for OPERATION_TTL seconds: the
-- same call run a second time (the client sent it again after a lost reply) gives the
-- same answer and changes nothing.
-- KEYS: dlq, letter, event, history, queue, stats, audit, audit index, lease, quota, watch,
-- operation. ARGV: id, now, now ms, history entry, message, audit entry, ttl, fields...
local done = redis.call('GET', KEYS[12])
if done then return done end
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 'missing' end
redis.call('SET', KEYS[12], 'queued', 'EX', ARGV[7])
if redis.call('EXISTS', KEYS[3]) == 0 then redis.call('HSET', KEYS[3], unpack(ARGV, 8)) end
local attempts = redis.call('HGET', KEYS[3], 'attempts') or '0'
redis.call('HSET', KEYS[3], 'status', 'queued', 'updated_at', ARGV[2], 'send', '',
           'claimed', '0', 'losses', '0', 'quota', '0', 'replay_base', attempts)
redis.call('RPUSH', KEYS[4], ARGV[4])
redis.call('LPUSH', KEYS[5], ARGV[5])
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2], KEYS[9])
redis.call('ZREM', KEYS[10], ARGV[1])
redis.call('RPUSH', KEYS[7], ARGV[6])
redis.call('ZADD', KEYS[8], ARGV[3], ARGV[1])
redis.call('HINCRBY', KEYS[6], 'replays:queued', 1)
-- Watched like a newly accepted event, so that a lost message is given a new one.
redis.call('ZADD', KEYS[11], redis.call('TIME')[1], ARGV[1])
return 'queued'
