-- Revoke families. KEYS: [revocation stream,] family hashes.
-- ARGV: now ms, reason, token hash ('' = none), '1' if KEYS[1] is the revocation stream,
--       stream MINID, event expiry ms, the token's generation if its MAC is valid (else 0).
--       (feed.lua is prepended.)
-- With a token hash, the (single) family is revoked only if the token is its current one,
-- an older generation (genuine by its MAC) or a v1 token recorded as used, so a guessed
-- session id cannot be used to revoke someone else's session.
-- Returns {session ids this call revoked, session ids owned but revoked before}: without
-- the stream (Cluster) the service appends events for both, so a retry after a lost append
-- still announces the revocation.
local stream = ARGV[4] == '1' and KEYS[1] or nil
local out, before = {}, {}
for i = stream and 2 or 1, #KEYS do
  local fam = KEYS[i]
  local state, cur, gen = unpack(redis.call('HMGET', fam, 'state', 'cur', 'gen'))
  local tgen = tonumber(ARGV[7] or '0')
  local owned = ARGV[3] == '' or cur == ARGV[3] or
    (tgen > 0 and tgen <= tonumber(gen or '0')) or
    redis.call('HEXISTS', fam, 'u:' .. ARGV[3]) == 1
  if state == 'active' and owned then
    redis.call('HSET', fam, 'state', 'revoked', 'revoked_at', ARGV[1], 'reason', ARGV[2])
    local sid = string.match(fam, ':fam:(%x+)$')
    out[#out + 1] = sid
    emit(stream, ARGV[5], 'session', sid, ARGV[6])
  elseif state and owned then
    before[#before + 1] = string.match(fam, ':fam:(%x+)$')
  end
end
return {out, before}
