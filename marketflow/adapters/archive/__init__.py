"""The Parquet archive's adapters: the files and manifest (``parquet.py``) and the reader
that answers history queries over archived days (``history.py``). The database side is
``adapters/postgres/archive_source.py``; the use case is ``app/archive.py``."""
