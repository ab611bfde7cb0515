"""Model intake and architecture adapters (installed as `leptonc.models`)."""
