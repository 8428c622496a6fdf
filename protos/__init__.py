"""Envoy wire helpers: the ext_proc filter config we install, and protobuf builders for responses."""
