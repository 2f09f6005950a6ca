"""Fixtures for the ml tests."""
