"""The embedded SQLite stores: one plumbing module (``database.py``: a threaded connection,
migrations, error translation) under the minute store (``minute_store.py``) and the FIX
audit trail (``adapters/capture/sqlite_store.py``)."""
