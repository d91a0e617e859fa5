-- Extend the lease KEYS[1] to ARGV[2] ms if the run ARGV[1] still holds it. Returns 1 if so.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
