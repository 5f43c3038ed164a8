import pytest


def pytest_addoption(parser):
    parser.addoption(
        "--run-slow", action="store_true", default=False,
        help="also run tests marked slow (training runs) and browser (Chromium)",
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: training runs and long end-to-end checks")
    config.addinivalue_line("markers", "browser: real-browser tests in Chromium driven by Playwright")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow/browser test: run with --run-slow")
    for item in items:
        if "slow" in item.keywords or "browser" in item.keywords:
            item.add_marker(skip)
