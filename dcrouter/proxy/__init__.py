"""The TCP/TLS proxy: SNI passthrough, TLS termination, HTTP routing, load balancing."""
