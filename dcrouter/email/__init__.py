"""The inbound side of the email gateway: SMTP server, routing, processing, scanning."""
