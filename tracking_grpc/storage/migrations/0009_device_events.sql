-- tracking: no transaction
-- Every event the service raises is stored, not only geofence events: activity
-- events (ONLINE, OFFLINE, TRIP_STARTED ...) and route events (OFF_ROUTE, ARRIVED ...)
-- go to the same table (its name is historical), so that ListEvents, the outbox of
-- the Redis Stream, erasure and retention treat them as geofence events.
-- ``route_id`` names the route of a route event ('' for others); ``activity`` holds
-- the ActivityDetail of an activity event (NULL for others).
ALTER TABLE geofence_events ADD COLUMN IF NOT EXISTS route_id text NOT NULL DEFAULT '';
ALTER TABLE geofence_events ADD COLUMN IF NOT EXISTS activity jsonb;

-- The memberships query (the dwell timer's restart) reads ENTER, EXIT and DWELL
-- only: activity events, far more numerous, stay out of its way.
CREATE INDEX CONCURRENTLY IF NOT EXISTS geofence_events_memberships
    ON geofence_events (tenant, device, fence_id) WHERE type IN (1, 2, 3);
