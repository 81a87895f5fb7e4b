"""Kafka wire protocol codec. Pure functions over bytes; no I/O here."""
