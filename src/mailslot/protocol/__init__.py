"""Protobuf schemas and their generated modules (regenerate with `make proto`)."""
