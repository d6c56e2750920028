-- The signing key ring's lifecycle, one atomic step per call, on Redis's clock so every
-- replica agrees on when a transition is due and exactly one performs it.
-- KEYS[1] ring hash (kid -> record JSON)   KEYS[2] active kid   KEYS[3] ring version
-- KEYS[4] (optional) kid -> record of deleted keys whose private key lives in a token
--         (backend 'pkcs11'): a replica with the token destroys the object, then the entry
-- ARGV[1] operation:
--   tick   ARGV: rotation interval ms, publish delay ms, keep-after-retire ms, [new record]
--          Deletes retired keys whose tokens have all expired, promotes a pending key once
--          it has been published for the publish delay, and schedules the next key (a
--          pending key published `publish delay` before the active one is due). Without a
--          new record when one is needed it returns {'need_key', version}.
--   rotate ARGV: publish delay ms, now ('1'/'0'), revoke_old ('1'/'0'), new record
--   retire ARGV: kid
--   rewrap ARGV: kid, old record JSON, new record JSON, ... (replaced only if unchanged)
-- Returns {'ok', version} or {error code, version}. Times in records are ms.
local ring, active_key, version_key = KEYS[1], KEYS[2], KEYS[3]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local recs = {}
local raw = redis.call('HGETALL', ring)
for i = 1, #raw, 2 do recs[raw[i]] = cjson.decode(raw[i + 1]) end
local active_kid = redis.call('GET', active_key)
local active = active_kid and recs[active_kid] or nil
local pending_kid = nil
for kid, r in pairs(recs) do
  if r.state == 'pending' then pending_kid = kid end
end
local changed = false

local function save(kid, r)
  redis.call('HSET', ring, kid, cjson.encode(r))
  changed = true
end

local function drop(kid)
  local r = recs[kid]
  if KEYS[4] and r and r.backend and r.backend ~= 'local' then
    redis.call('HSET', KEYS[4], kid, cjson.encode(r))
  end
  redis.call('HDEL', ring, kid)
  recs[kid] = nil
  changed = true
end

local function activate(kid)
  if active then
    active.state = 'retired'
    active.retired_ms = now
    save(active_kid, active)
  end
  local r = recs[kid]
  r.state = 'active'
  r.activated_ms = now
  r.activate_after_ms = nil
  save(kid, r)
  redis.call('SET', active_key, kid)
  active_kid, active = kid, r
end

local function version()
  if changed then return redis.call('INCR', version_key) end
  return tonumber(redis.call('GET', version_key) or '0')
end

local op = ARGV[1]
if op == 'tick' then
  local interval, publish, keep = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
  for kid, r in pairs(recs) do
    if r.state == 'retired' and (r.retired_ms or 0) + keep <= now then drop(kid) end
  end
  if pending_kid and (recs[pending_kid].activate_after_ms or 0) <= now then
    activate(pending_kid)
    pending_kid = nil
  end
  if not pending_kid and active and (active.activated_ms or 0) + interval - publish <= now then
    if not ARGV[5] or ARGV[5] == '' then return {'need_key', version()} end
    local r = cjson.decode(ARGV[5])
    r.state = 'pending'
    r.created_ms = now
    r.activate_after_ms = math.max(now + publish, (active.activated_ms or 0) + interval)
    recs[r.kid] = r
    save(r.kid, r)
  end
elseif op == 'rotate' then
  local publish, at_once, revoke_old = tonumber(ARGV[2]), ARGV[3] == '1', ARGV[4] == '1'
  if at_once then
    local r = cjson.decode(ARGV[5])
    r.created_ms = now
    recs[r.kid] = r
    if pending_kid then drop(pending_kid) end -- superseded before it ever signed
    activate(r.kid)
    if revoke_old then
      for kid, _ in pairs(recs) do
        if kid ~= r.kid then drop(kid) end
      end
    end
  elseif pending_kid then
    -- a key is already published: let it sign as soon as it has been published long enough
    local p = recs[pending_kid]
    p.activate_after_ms = math.max(now, (p.created_ms or now) + publish)
    save(pending_kid, p)
  else
    local r = cjson.decode(ARGV[5])
    r.state = 'pending'
    r.created_ms = now
    r.activate_after_ms = now + publish
    save(r.kid, r)
  end
elseif op == 'retire' then
  local r = recs[ARGV[2]]
  if not r then return {'unknown', version()} end
  if r.state == 'active' then return {'active', version()} end
  if r.state == 'pending' then drop(ARGV[2]) end -- it never signed anything
elseif op == 'rewrap' then
  for i = 2, #ARGV, 3 do
    if redis.call('HGET', ring, ARGV[i]) == ARGV[i + 1] then
      redis.call('HSET', ring, ARGV[i], ARGV[i + 2])
      changed = true
    end
  end
else
  return redis.error_reply('unknown key ring operation')
end
return {'ok', version()}
