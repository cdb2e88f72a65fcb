"""Thin servicers: check the request, call the store, build the response."""
