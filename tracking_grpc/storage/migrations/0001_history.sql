-- Fixes partitioned by fix time, and per-device state. See docs/storage.md.
CREATE EXTENSION IF NOT EXISTS postgis;

-- One row per stored fix. The primary key (tenant, device, time_ms) makes a second
-- fix of a device at the same fix time a conflict, and serves "one device over a time
-- range". The partition key time_ms must be part of every unique key, so the other
-- duplicate rule (same seq) is enforced by the writer with the devices row locked.
CREATE TABLE fixes (
    tenant text NOT NULL,
    device text NOT NULL,
    time_ms bigint NOT NULL,
    seq bigint NOT NULL,
    position geometry(Point, 4326) NOT NULL,
    accuracy_m real,
    altitude_m real,
    speed_mps real,
    heading_deg real,
    battery_pct real,
    provider smallint NOT NULL DEFAULT 0,
    received_ms bigint NOT NULL,
    PRIMARY KEY (tenant, device, time_ms)
) PARTITION BY RANGE (time_ms);

-- Probed only for fixes whose seq is not above the device's last stored seq.
CREATE INDEX fixes_device_seq ON fixes (tenant, device, seq);
-- An area over a time range: partitions prune the time, GiST finds the area.
CREATE INDEX fixes_position ON fixes USING gist (position);
-- Every device over a time range inside a partition: rows arrive nearly in time
-- order, so a BRIN index of a few pages does what a B-tree would at a fraction.
CREATE INDEX fixes_time ON fixes USING brin (time_ms);

-- Fixes whose day has no partition (and never got one; see below) land here.
CREATE TABLE fixes_default PARTITION OF fixes DEFAULT;

CREATE TABLE devices (
    tenant text NOT NULL,
    device text NOT NULL,
    last_stored_seq bigint,
    last_time_ms bigint,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, device)
);

-- Creates the partition of one UTC day (day = time_ms / 86400000) unless it exists
-- or the default partition already holds rows of that day. Returns whether it made
-- one. Creators serialise on an advisory lock so that processes can race safely.
CREATE FUNCTION tracking_ensure_partition(day bigint) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    name text := 'fixes_'
        || to_char(to_timestamp(day * 86400) AT TIME ZONE 'UTC', 'YYYYMMDD');
    low bigint := day * 86400000;
    high bigint := (day + 1) * 86400000;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('tracking_partitions'));
    IF to_regclass(name) IS NOT NULL THEN
        RETURN false;
    END IF;
    IF EXISTS (SELECT 1 FROM fixes_default WHERE time_ms >= low AND time_ms < high) THEN
        RETURN false;
    END IF;
    EXECUTE format(
        'CREATE TABLE %I PARTITION OF fixes FOR VALUES FROM (%s) TO (%s)',
        name, low, high
    );
    RETURN true;
END;
$$;

-- Days (time_ms / 86400000) that have a partition.
CREATE FUNCTION tracking_partition_days() RETURNS SETOF bigint
LANGUAGE sql STABLE AS $$
    SELECT (extract(epoch FROM to_date(substr(c.relname, 7), 'YYYYMMDD')) / 86400)::bigint
    FROM pg_inherits i
    JOIN pg_class c ON c.oid = i.inhrelid
    WHERE i.inhparent = 'fixes'::regclass AND c.relname ~ '^fixes_[0-9]{8}$'
$$;
