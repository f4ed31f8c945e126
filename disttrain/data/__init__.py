"""Data: distributed samplers and loaders, and moving batches to the device."""
