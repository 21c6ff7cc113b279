"""Wire-compatibility tests against real Celery on Redis (both directions)."""
