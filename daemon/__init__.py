"""The Sluice daemon: supervisor, workers, accumulator, sender and the Kafka wire codec.

It imports :mod:`shm` (the client side), never the reverse.
"""
