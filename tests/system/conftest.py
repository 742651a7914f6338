"""The ``system`` marker: tests that boot a Debian guest under systemd (opt-in, AKIDB_SYSTEM_TESTS=1)."""


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "system: boots a Debian 12 guest with systemd-nspawn to test the .deb (AKIDB_SYSTEM_TESTS=1)"
    )
