"""Fakes for unit tests of our own logic: an in-memory kernel and store. Never used by
kernel or integration tests, which run on the real ones."""
