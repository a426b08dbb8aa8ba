"""The vectorised spatial core: arrays in, arrays out, no I/O."""
