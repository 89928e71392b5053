"""Test support: deterministic handlers and a running-service harness."""
