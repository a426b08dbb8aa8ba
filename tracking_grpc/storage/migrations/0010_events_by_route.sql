-- tracking: no transaction
-- One route's events: ListEvents with a route_id (in the order it pages by) finds
-- them through this index instead of scanning every event of the tenant in the time
-- range. Partial: most events (geofence and activity ones) have no route ('') and
-- stay out of it; a query names the predicate (route_id <> '') to use it.
CREATE INDEX CONCURRENTLY IF NOT EXISTS geofence_events_route
    ON geofence_events (tenant, route_id, time_ms, event_id COLLATE "C")
    WHERE route_id <> '';
