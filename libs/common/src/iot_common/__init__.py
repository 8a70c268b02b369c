"""Shared schema library of the IoT platform: messages, names, settings, logging and database access."""
