"""The reference web UI: a page and its server, which reaches the services only through aevae.client."""
