-- tracking: no transaction
-- One device's geofence events: ListEvents with a device (in the order it pages by)
-- and EraseDevice find them through this index instead of scanning every event of
-- the tenant in the time range (or, for an erasure, of all time).
CREATE INDEX CONCURRENTLY IF NOT EXISTS geofence_events_device
    ON geofence_events (tenant, device, time_ms, event_id COLLATE "C");
