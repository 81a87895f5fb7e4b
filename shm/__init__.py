"""Sluice's client side: shared-memory rings, segments, frames and the partitioner.

Applications import only this package. It never imports :mod:`daemon`.
"""
