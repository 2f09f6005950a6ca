"""Fixtures for the service tests."""
