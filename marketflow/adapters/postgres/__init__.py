"""PostgreSQL: one pool, one error translation, one migration runner (``database.py``), and
the stores built on them: minute rows (``minute_store.py``); the FIX audit trail lives with
the capture feature (``adapters/capture/postgres_store.py``) on the same plumbing."""
