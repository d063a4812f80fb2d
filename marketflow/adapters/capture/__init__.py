"""The FIX capture feature's adapters (audit trail): the TCP listener (``listener.py``), the
decoder that validates and parses each message (``decoder.py``), and its stores on the shared
database plumbing (``postgres_store.py``, ``sqlite_store.py``). The use case is
``app/capture.py``; the routes are ``entrypoints/http_messages.py``."""
