"""Fixtures for the inference tests."""
