import pytest

from orgbilling.server.app import OrgBillingServer
from orgbilling.server.settings import Settings
from tests.support import Client, PostgresForTests, admin_token


@pytest.fixture(scope="session")
def postgres():
    server = PostgresForTests()
    yield server
    server.close()


@pytest.fixture
def database_url(postgres):
    """A fresh, migrated database for this test alone."""
    return postgres.new_database()


def start_server(database_url: str, **overrides) -> OrgBillingServer:
    settings = Settings(
        listen_address="127.0.0.1:0", database_url=database_url,
        health_check_interval_ms=200, pool_size_min=2, **overrides,
    )
    server = OrgBillingServer(settings, database_url)
    server.start()
    return server


@pytest.fixture
def server(database_url, token):
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


def pytest_addoption(parser):
    # `make fuzz` runs tests/test_fuzz.py long; `make test` uses its short default.
    parser.addoption("--fuzz-examples", type=int, default=None,
                     help="hypothesis examples per RPC and kind in tests/test_fuzz.py")


@pytest.fixture
def embedded_data_dir():
    """A data directory for a server's own embedded PostgreSQL, outside
    pytest's tmp_path: pytest resets its root to mode 0700 whenever a pytest
    session starts, and the embedded server's own system user must reach it."""
    import shutil
    import tempfile
    from pathlib import Path

    from orgbilling.server.database import stop_embedded_database

    path = Path(tempfile.mkdtemp(prefix="orgbilling-embedded-"))
    yield path
    try:
        stop_embedded_database(path)  # normally stopped already, with its server
    finally:
        shutil.rmtree(path, ignore_errors=True)
