-- Routes assigned to devices (Route/AssignRoute), one per device, with the route
-- monitor's latest checkpoint, so that every server process monitors them and a
-- restarted one goes on. ``plan`` is the route's geometry and the expected time of
-- each segment, ``state`` the monitor's packed progress (both opaque here);
-- ``applied_ms`` is the fix time of the newest fix the state covers: a checkpoint
-- never replaces one that covers more, nor the state of another assignment.
-- ``ended``: the device arrived; kept for GetRouteProgress, no longer monitored.
-- Rewritten often, like devices: pages filled to half.
CREATE TABLE IF NOT EXISTS assigned_routes (
    tenant text NOT NULL,
    device text NOT NULL,
    route_id text NOT NULL,
    assigned_ms bigint NOT NULL,
    plan bytea NOT NULL,
    applied_ms bigint NOT NULL,
    state bytea NOT NULL,
    ended boolean NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, device)
) WITH (fillfactor = 50);
