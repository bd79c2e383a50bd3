"""The reliability tests reuse the service tests' fixtures and helpers (tests/e2e/conftest.py):
the in-process `client` (real default model, small LIMITS) and `start_server` (real uvicorn
subprocesses on loopback). Importing a fixture into a conftest makes it visible to this folder."""

from tests.e2e.conftest import client, start_server  # noqa: F401 (fixtures)
