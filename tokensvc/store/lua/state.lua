-- Read-only: revocation state of a family and its subject, in one round trip.
-- KEYS[1] family hash   KEYS[2] subject hash   KEYS[3] jti key (or the family key again)
-- [KEYS[4] the key ring's version counter: not on Redis Cluster, where it is in another slot]
-- ARGV: field names to read from the family
-- Returns {family values..., subject watermark or false, jti revoked (0/1), ring version}
local out = redis.call('HMGET', KEYS[1], unpack(ARGV))
out[#ARGV + 1] = redis.call('HGET', KEYS[2], 'revoked_before')
out[#ARGV + 2] = (KEYS[3] ~= KEYS[1]) and redis.call('EXISTS', KEYS[3]) or 0
out[#ARGV + 3] = KEYS[4] and tonumber(redis.call('GET', KEYS[4]) or '0') or -1
return out
