"""The authoritative DNS server and the email records it publishes."""
