"""The repository layer: narrow async interfaces, embedded and production backends."""
