"""The management API, Prometheus metrics and the status page."""
