"""Test upstreams: validating mock providers of each API family, and a translating relay."""
