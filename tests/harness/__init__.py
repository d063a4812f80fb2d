"""Test harness: real throwaway PostgreSQL and Redis servers on free ports."""
