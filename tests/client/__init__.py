"""Tests of the Python client library: TokenClient, interceptors, call credentials."""
