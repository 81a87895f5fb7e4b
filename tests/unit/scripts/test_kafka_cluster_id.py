"""scripts/kafka_cluster_id.py: ids the storage tool accepts, never one it reads as an option.

CI once failed because a random id began with "-" and `kafka-storage format -t -xyz...` took it
for a flag; the generator must draw again in that case.
"""

from __future__ import annotations

import base64
import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "scripts" / "kafka_cluster_id.py"


def load():
    spec = importlib.util.spec_from_file_location("kafka_cluster_id", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ids_are_16_bytes_and_never_start_with_a_dash():
    module = load()
    # 4,000 draws: without the redraw about 62 of them would start with "-".
    ids = [module.new_cluster_id() for _ in range(4000)]
    assert len(set(ids)) == len(ids)
    for text in ids:
        assert text[0] != "-"
        assert len(text) == 22
        assert len(base64.urlsafe_b64decode(text + "==")) == 16


def test_redraws_when_the_first_id_starts_with_a_dash(monkeypatch):
    module = load()
    # The first draw encodes to "-" first (0xf8 >> 2 == 62, the '-' of the URL-safe alphabet).
    draws = iter([b"\xf8" + bytes(15), b"\x00" * 16])
    monkeypatch.setattr(module.os, "urandom", lambda n: next(draws))
    assert module.new_cluster_id() == "A" * 22


def test_script_prints_one_id():
    out = subprocess.run([sys.executable, str(SCRIPT)], check=True, capture_output=True, text=True)
    line = out.stdout.strip()
    assert "\n" not in line and len(line) == 22 and line[0] != "-"
