"""Device models: one device per file (kvmtool style)."""
