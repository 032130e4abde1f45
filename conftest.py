"""Fixtures shared by tests/ and e2e/ (the generated tiny model, its adapters, a real vLLM server)."""

pytest_plugins = ["tests.fixtures.plugin"]
