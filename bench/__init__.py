"""Sluice's benchmark harness (``python -m bench``); see bench/README.md.

Modules: ``harness`` (cases, results, targets), ``scenarios`` (what is produced),
``client`` (what every client process shares), ``peers/`` (confluent-kafka, aiokafka, Kafka's
ProducerPerformance), ``sluice_shm`` / ``sluice_socket`` (the Sluice runners),
``sluice_daemon`` (a daemon per case), ``measure``, ``verify``, ``progress``, ``plot``.
"""

__all__: list[str] = []
