"""``python -m bench``: Sluice against confluent-kafka, aiokafka and Kafka's ProducerPerformance.

See bench/README.md for what is measured and how to reproduce; ``python -m bench --help`` for options.
"""

from __future__ import annotations

import sys

from bench.harness import main

__all__: list[str] = []

if __name__ == "__main__":
    if sys.argv[1:2] == ["micro"]:
        from bench.micro import main as micro

        sys.exit(micro(sys.argv[2:]))
    sys.exit(main())
