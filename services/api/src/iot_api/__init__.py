"""REST API service of the IoT platform."""
