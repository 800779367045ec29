import os

import pytest

# Tests run on the CPU platform whatever the machine has, unless asked otherwise.
os.environ.setdefault("LONGVITA_PLATFORM", "cpu")


@pytest.fixture(scope="session", autouse=True)
def platform_patches():
    """The test session is an entry point, as train.py is: the platform's patch set is applied
    once, here (and in each rank by tests/harness.py); model code only detects the platform."""
    from megatron_longvita.platform import setup_platform

    return setup_platform()
