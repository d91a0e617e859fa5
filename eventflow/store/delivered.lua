-- The server answered 250: the record, its history, the counters, the send-duration
-- histogram and the lease, in one step. KEYS: event, history, stats, watch, timing, lease.
-- ARGV: now, the attempt's and the delivered history entries, event id, retention
-- seconds, duration seconds, then the histogram buckets the duration falls in.
-- Returns 1, or 0 when the event was delivered already.
--
-- Run twice (a reply lost, the call sent again), or by a second run whose send was also
-- answered 250: the event is delivered once and counted once. The first run's entries
-- end its history, and a second run finds them there and changes nothing; another run's
-- 250 is added to the history as its attempt, and nothing else.
if not fenced(KEYS[1], KEYS[2], ARGV[7], ARGV[8]) then return 0 end
if redis.call('HGET', KEYS[1], 'status') == 'delivered' then
  local last = redis.call('LINDEX', KEYS[2], -1)
  if last ~= ARGV[3] and last ~= ARGV[2] then redis.call('RPUSH', KEYS[2], ARGV[2]) end
  return 0
end
redis.call('HSET', KEYS[1], 'status', 'delivered', 'send', 'done', 'delivered_at', ARGV[1],
           'updated_at', ARGV[1], 'claimed', '0')
redis.call('HDEL', KEYS[1], 'take')
redis.call('RPUSH', KEYS[2], ARGV[2], ARGV[3])
redis.call('HINCRBY', KEYS[3], 'delivered', 1)
redis.call('ZREM', KEYS[4], ARGV[4])
for i = 9, #ARGV do redis.call('HINCRBY', KEYS[5], ARGV[i], 1) end
redis.call('HINCRBY', KEYS[5], 'count', 1)
redis.call('HINCRBYFLOAT', KEYS[5], 'sum', ARGV[6])
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[5])
redis.call('DEL', KEYS[6])
return 1
