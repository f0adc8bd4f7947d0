"""Fixtures the whole-system tests share with the server tests (real Market-1501 crops, read by path)."""

from tests.server.conftest import market  # noqa: F401 - re-exported fixture
