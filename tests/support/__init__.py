"""Helpers shared by the test suites: where the backing services are, and processes under test."""
