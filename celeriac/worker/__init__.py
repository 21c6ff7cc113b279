"""The worker: one asyncio loop that consumes, runs tasks in a pool and settles them."""
