"""The service account and the toolkit's directories on a host."""
