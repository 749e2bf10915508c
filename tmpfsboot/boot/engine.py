"""Placeholder replaced by the engine commit."""
DEFAULT_BACKOFF = 10.0
def fetch_root(*a, **k): raise NotImplementedError
