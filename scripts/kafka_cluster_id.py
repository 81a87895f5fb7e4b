"""Print a fresh KRaft cluster id for `kafka-storage format -t ID`.

A cluster id is 16 random bytes in unpadded URL-safe base64. One id in 64 starts with "-",
which the storage tool's argument parser reads as an option ("argument --cluster-id/-t:
expected one argument"), so such ids are drawn again, as Kafka's own random-uuid command does.
Stdlib only: it runs before the project's virtual environment exists.
"""

from __future__ import annotations

import base64
import os


def new_cluster_id() -> str:
    while True:
        text = base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode()
        if text[0] != "-":
            return text


if __name__ == "__main__":
    print(new_cluster_id())
