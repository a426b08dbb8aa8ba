-- Positions indexed with SP-GiST (a quad-tree over points) instead of GiST. Area
-- queries use it through the same operators (&&, and ST_Intersects/ST_DWithin via
-- their index support), and each stored fix costs about 2 µs less of PostgreSQL
-- CPU to index (bench/README.md, "Gateway throughput"). See docs/storage.md.
DROP INDEX IF EXISTS fixes_position;
CREATE INDEX fixes_position ON fixes USING spgist (position);
