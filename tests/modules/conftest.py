"""Fixtures shared by the module tests."""
import pytest


@pytest.fixture
def backend(cpu_backend):
    """Both CPU backends (tests/conftest.py's ``cpu_backend``)."""
    return cpu_backend
