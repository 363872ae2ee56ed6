-- Argo CD health of a meshkeeper.dev/Mesh (argocd-cm key
-- resource.customizations.health.meshkeeper.dev_Mesh; see argocd-cm.yaml).
--
-- meshkeeper's conditions follow kstatus and each carries the generation it
-- was computed for; only conditions of the current generation count, so a
-- Mesh is never reported on a spec meshkeeper has not seen yet.
--   Degraded     Stalled, Degraded or RolledBack is True, or a rollback runs
--   Progressing  not yet observed (status.observedGeneration < generation),
--                or a rollout is under way, or not Ready yet
--   Suspended    spec.paused (the plan is published, nothing runs)
--   Healthy      Ready=True at the current generation, no rollout running
local hs = {}
local generation = obj.metadata.generation or 0
local status = obj.status or {}

local function current(type)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == type and (c.observedGeneration or 0) == generation then
      return c
    end
  end
  return nil
end

local function isTrue(type)
  local c = current(type)
  return c ~= nil and c.status == "True", c
end

local function say(state, msg)
  hs.status = state
  hs.message = msg
  return hs
end

local stalled, c = isTrue("Stalled")
if stalled then
  return say("Degraded", "Stalled (" .. (c.reason or "") .. "): " .. (c.message or ""))
end
local degraded, c = isTrue("Degraded")
if degraded then
  return say("Degraded", "Degraded (" .. (c.reason or "") .. "): " .. (c.message or ""))
end
local rollout = status.rollout
if rollout ~= nil and rollout.step == "RollingBack" then
  return say("Degraded", "Rolling " .. (rollout.to or "?") .. " back to " .. (rollout.from or "?") .. ": " .. (rollout.message or ""))
end

local ready, rc = isTrue("Ready")
if (status.observedGeneration or 0) < generation then
  local msg = "Waiting for meshkeeper to observe generation " .. generation
  if rc ~= nil and rc.message ~= nil and rc.message ~= "" then
    msg = rc.message
  end
  return say("Progressing", msg)
end
if obj.spec ~= nil and obj.spec.paused == true then
  return say("Suspended", "spec.paused is true: the plan is in status.plan, nothing is executed")
end
if rollout ~= nil then
  return say("Progressing", "Rolling out " .. (rollout.to or "?") .. " (" .. (rollout.step or "") .. " wave " .. (rollout.wave or 0) .. "/" .. (rollout.waves or 0) .. "): " .. (rollout.message or ""))
end
local rolledBack, c = isTrue("RolledBack")
if rolledBack then
  return say("Degraded", "RolledBack: " .. (c.message or ""))
end
if ready then
  return say("Healthy", rc.message or "Ready")
end
if rc ~= nil then
  return say("Progressing", "Ready=" .. (rc.status or "Unknown") .. " (" .. (rc.reason or "") .. "): " .. (rc.message or ""))
end
return say("Progressing", "Waiting for meshkeeper to report Ready")
