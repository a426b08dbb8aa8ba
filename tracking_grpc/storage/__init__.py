"""The repository layer: narrow async interfaces with embedded and production backends."""
