-- Each device's live activity (odometer, stop or trip, motion, filter), saved by the
-- server process that applies its fixes every activity_checkpoint_s and at a clean
-- stop, so that a restarted server, or another process, continues it. ``state`` is
-- the activity processor's packed record (opaque here); ``applied_ms`` the fix time
-- of the newest fix it covers: an upsert never replaces a checkpoint with one that
-- covers less. Small and rewritten often, like devices: pages filled to half.
CREATE TABLE IF NOT EXISTS activity_checkpoints (
    tenant text NOT NULL,
    device text NOT NULL,
    applied_ms bigint NOT NULL,
    state bytea NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, device)
) WITH (fillfactor = 50);
