"""The daemon: socket, HTTP, API and JSON views, config-file sources, systemd, hardening."""
