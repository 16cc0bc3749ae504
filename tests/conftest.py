"""Shared pytest configuration: every test runs in pytest-twisted's reactor."""
