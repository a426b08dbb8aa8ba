-- Geofences and their events. See docs/geofencing.md.
CREATE EXTENSION IF NOT EXISTS postgis;

-- One row per fence: the fence as given (JSON), its labels for filtering, and its
-- area (lon/lat, split at the antimeridian; for circles a polygon just larger than
-- the circle) for spatial queries.
CREATE TABLE IF NOT EXISTS geofences (
    tenant text NOT NULL,
    fence_id text NOT NULL,
    spec text NOT NULL,
    labels text[] NOT NULL DEFAULT '{}',
    version bigint NOT NULL,
    area geometry(Geometry, 4326) NOT NULL,
    PRIMARY KEY (tenant, fence_id)
);
CREATE INDEX IF NOT EXISTS geofences_area ON geofences USING gist (area);
CREATE INDEX IF NOT EXISTS geofences_labels ON geofences USING gin (labels);

-- Changes whenever a fence of the tenant is written, so evaluators know to reload.
CREATE TABLE IF NOT EXISTS geofence_revisions (
    tenant text PRIMARY KEY,
    revision bigint NOT NULL
);

-- Events de-duplicated by their stable id; listed by fix time. ``published`` is the
-- outbox flag: set once the event is on the Redis Stream.
CREATE TABLE IF NOT EXISTS geofence_events (
    tenant text NOT NULL,
    event_id text NOT NULL,
    device text NOT NULL,
    fence_id text NOT NULL,
    type smallint NOT NULL,
    time_ms bigint NOT NULL,
    lat double precision NOT NULL,
    lon double precision NOT NULL,
    fix_seq bigint NOT NULL,
    created_ms bigint NOT NULL,
    attributes jsonb NOT NULL DEFAULT '{}',
    published boolean NOT NULL DEFAULT false,
    PRIMARY KEY (tenant, event_id)
);
CREATE INDEX IF NOT EXISTS geofence_events_unpublished
    ON geofence_events (created_ms) WHERE NOT published;
CREATE INDEX IF NOT EXISTS geofence_events_time
    ON geofence_events (tenant, time_ms, event_id COLLATE "C");
