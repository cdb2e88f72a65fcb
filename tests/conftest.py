# Fixtures live in plugin modules, as psycopg's tests keep them.
pytest_plugins = ["tests.fix_db", "tests.fix_server"]


def pytest_addoption(parser):
    # `make fuzz` runs tests/test_fuzz.py long; `make test` uses its short default.
    parser.addoption("--fuzz-examples", type=int, default=None,
                     help="hypothesis examples per RPC and kind in tests/test_fuzz.py")
