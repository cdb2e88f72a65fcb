"""Fixtures of the server in this process: `start_server` to start servers
with settings of a test's own (stopped at the test's end if it did not),
and `server`, `token` and `client` for the common case."""

import pytest

from orgbilling.server.app import OrgBillingServer
from orgbilling.server.settings import Settings
from tests.support import Client, admin_token


def serve_in_process(database_url: str, **overrides) -> OrgBillingServer:
    """A started server in this process, on a free port, over database_url,
    with these settings; the caller stops it."""
    settings = Settings(
        listen_address="127.0.0.1:0", database_url=database_url,
        health_check_interval_ms=200, pool_size_min=2, **overrides,
    )
    server = OrgBillingServer(settings, database_url)
    server.start()
    return server


@pytest.fixture
def start_server():
    """serve_in_process, for a test: every server it started and did not
    stop is stopped at its end."""
    started = []

    def start(database_url: str, **overrides) -> OrgBillingServer:
        server = serve_in_process(database_url, **overrides)
        started.append(server)
        return server

    yield start
    for server in started:
        if not server.pool.closed:
            server.stop()


@pytest.fixture
def server(start_server, database_url, token):
    """A real server, in this process, on a free port, over its own database
    (whose all-scopes `token` exists before the server starts)."""
    running = start_server(database_url)
    yield running
    running.stop()


@pytest.fixture
def token(database_url):
    """An API key with every scope on every organization, for this test's database."""
    return admin_token(database_url)


@pytest.fixture
def client(server, token):
    """A client of `server` whose every call carries the all-scopes `token`."""
    client = Client(f"127.0.0.1:{server.port}", token=token)
    yield client
    client.close()
