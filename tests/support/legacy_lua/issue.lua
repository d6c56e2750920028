-- Start a refresh family. One atomic step.
-- KEYS[1] family hash   KEYS[2] subject's session index (zset sid -> expiry ms)
-- KEYS[3] subject hash (lock flag)   KEYS[4] subject's Issue rate limiter
-- ARGV: sid, token hash, now ms, token expiry ms, family expiry ms, subject, client_id,
--       label, claims (JSON carried to every access token of the family),
--       cnf thumbprint ('' = unbound), rate interval µs (0 = no limit), rate tolerance µs
-- Returns {'ok'} | {'locked'} | {'limited', ms to wait}. (gcra.lua is prepended.)
-- 'created' is Redis's own clock, like the subject watermark it is compared with
-- (revoke_subject.lua), so replicas with skewed clocks cannot misorder the two.
local fam, sessions = KEYS[1], KEYS[2]
if redis.call('HEXISTS', KEYS[3], 'locked') == 1 then return {'locked'} end
local wait = gcra(KEYS[4], tonumber(ARGV[11]), tonumber(ARGV[12]))
if wait > 0 then return {'limited', wait} end
local now, fam_exp = tonumber(ARGV[3]), tonumber(ARGV[5])
local t = redis.call('TIME')
local created = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', fam,
  'state', 'active', 'cur', ARGV[2], 'cur_exp', ARGV[4], 'created', created,
  'last', created, 'exp', ARGV[5], 'sub', ARGV[6], 'cid', ARGV[7], 'label', ARGV[8],
  'claims', ARGV[9], 'cnf', ARGV[10])
redis.call('PEXPIREAT', fam, fam_exp)
redis.call('ZREMRANGEBYSCORE', sessions, '-inf', now)
redis.call('ZADD', sessions, fam_exp, ARGV[1])
local newest = redis.call('ZRANGE', sessions, -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', sessions, tonumber(newest[2]))
return {'ok'}
