-- Unlock a subject. KEYS[1] subject hash. ARGV: watermark ttl ms.
-- The revocation watermark stays (revoked sessions stay revoked) and expires as usual.
-- Returns 1 if the subject was locked.
local removed = redis.call('HDEL', KEYS[1], 'locked', 'lock_reason')
if removed == 0 then return 0 end
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return 1
