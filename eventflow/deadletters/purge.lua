-- Purge what is older than the cutoff (ARGV[2], ms): the dead letter if it failed
-- before it (with its audit trail), or else the audit trail of a letter that left the
-- queue if its last entry is older. KEYS as for delete.lua. ARGV: id, cutoff, history
-- entry, retention seconds, '1' to only count. Returns {letters purged, trails purged}.
local cutoff = tonumber(ARGV[2])
local failed = redis.call('ZSCORE', KEYS[1], ARGV[1])
if failed then
  if tonumber(failed) >= cutoff then return {0, 0} end
  if ARGV[5] == '1' then return {1, 0} end
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('DEL', KEYS[2], KEYS[5])
  redis.call('ZREM', KEYS[6], ARGV[1])
  redis.call('RPUSH', KEYS[4], ARGV[3])
  redis.call('EXPIRE', KEYS[3], ARGV[4])
  redis.call('EXPIRE', KEYS[4], ARGV[4])
  return {1, 0}
end
local last = redis.call('ZSCORE', KEYS[6], ARGV[1])
if not last or tonumber(last) >= cutoff then return {0, 0} end
if ARGV[5] == '1' then return {0, 1} end
redis.call('DEL', KEYS[5])
redis.call('ZREM', KEYS[6], ARGV[1])
return {0, 1}
