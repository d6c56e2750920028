-- Start a refresh family. One atomic step.
-- KEYS[1] family hash   KEYS[2] subject's session index (zset sid -> expiry ms)
-- KEYS[3] subject hash (lock flag)   KEYS[4] subject's Issue rate limiter
-- (KEYS[3] also refuses: a lock found on the subject's legacy tag, see FamilyOps.create)
-- ARGV: sid, token hash, now ms, token expiry ms, family expiry ms, subject, client_id
--       (both unused: they are in the claims),
--       label, claims (JSON carried to every access token of the family),
--       cnf thumbprint ('' = unbound), rate interval µs (0 = no limit), rate tolerance µs
-- Returns {'ok', created ms} | {'locked'} | {'limited', ms to wait}. (gcra.lua is
-- prepended.) The first refresh token is generation 1 (families v2, tokensvc.tokens).
-- 'created' is Redis's own clock, like the subject watermark it is compared with
-- (revoke_subject.lua), so replicas with skewed clocks cannot misorder the two; the
-- service stamps the access token's iat with it, for the same reason.
local fam, sessions = KEYS[1], KEYS[2]
if redis.call('HEXISTS', KEYS[3], 'locked') == 1 then return {'locked'} end
local wait = gcra(KEYS[4], tonumber(ARGV[11]), tonumber(ARGV[12]))
if wait > 0 then return {'limited', wait} end
local now, fam_exp = tonumber(ARGV[3]), tonumber(ARGV[5])
local t = redis.call('TIME')
local created = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- a family created in the same second as (after) the subject's watermark is dated from the
-- next whole second: the feed carries the watermark to the millisecond and interceptors
-- refuse every iat (whole seconds) before it, so its tokens must carry a later second
local wm = tonumber(redis.call('HGET', KEYS[3], 'revoked_before') or '-1')
if wm >= 0 and math.floor(created / 1000) <= math.floor(wm / 1000) then
  created = (math.floor(wm / 1000) + 1) * 1000
end
-- (subject and client_id are in the claims; an empty label or cnf is not stored: each
-- field of a family costs Redis memory)
redis.call('HSET', fam,
  'state', 'active', 'cur', ARGV[2], 'cur_exp', ARGV[4], 'created', created,
  'last', created, 'exp', ARGV[5], 'claims', ARGV[9], 'gen', 1)
if ARGV[8] ~= '' then redis.call('HSET', fam, 'label', ARGV[8]) end
if ARGV[10] ~= '' then redis.call('HSET', fam, 'cnf', ARGV[10]) end
redis.call('PEXPIREAT', fam, fam_exp)
redis.call('ZREMRANGEBYSCORE', sessions, '-inf', now)
redis.call('ZADD', sessions, fam_exp, ARGV[1])
local newest = redis.call('ZRANGE', sessions, -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', sessions, tonumber(newest[2]))
return {'ok', created}
