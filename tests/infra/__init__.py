"""Test infrastructure: servers and processes a test may break on purpose.

- `postgres.PrivateServer`: a PostgreSQL of the test's own (its own data dir), which a test
  may restart, stop or whose backends it may terminate without touching the shared server.
- `pgbouncer.Bouncer`: a real PgBouncer (the distribution's package) in front of it.
- `workers.WorkerFleet`: several `scoopy worker` processes to SIGKILL and restart.
- `fixtures`: the pytest fixtures built on them (registered from tests/conftest.py).
"""
