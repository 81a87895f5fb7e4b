"""daemon.config: TOML loading, refusals naming the key, built-in profiles, rules, reload diff."""

from __future__ import annotations

import pathlib

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon import config as cfg
from daemon.config import (
    BUILTIN_PROFILES,
    Config,
    DaemonSettings,
    Profile,
    TopicRule,
    diff_live,
    load,
    loads,
)
from shm.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[3]


def refused(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        loads(text, source="test.toml")
    return str(info.value)


# --- defaults and the example file ----------------------------------------------------------


def test_empty_document_gives_kafka_defaults_and_builtins() -> None:
    c = loads("")
    assert c.daemon.socket_path == "/run/sluice/sluice.sock"
    assert c.daemon.socket_mode == 0o660
    assert c.daemon.request_ring_bytes == 4 * 1024 * 1024
    assert c.daemon.completion_ring_bytes == 256 * 1024
    assert c.kafka.bootstrap_servers == "127.0.0.1:9092"
    assert set(c.profiles) == {"default", "payments", "clicks"}
    assert c.profiles["default"] == Profile()
    assert c.profiles["default"].acks == -1 and c.profiles["default"].enable_idempotence
    assert c.topics == ()
    assert c == Config()


def test_builtin_profiles() -> None:
    pay, clicks = BUILTIN_PROFILES["payments"], BUILTIN_PROFILES["clicks"]
    assert (pay.acks, pay.enable_idempotence, pay.on_full, pay.linger_ms) == (-1, True, "block", 5)
    assert (clicks.acks, clicks.enable_idempotence, clicks.linger_ms) == (1, False, 50)
    assert (clicks.compression_type, clicks.on_full) == ("zstd", "drop")


def test_example_file_loads() -> None:
    c = load(REPO / "systemd" / "sluice.toml")
    assert c.profile_name_for("payments.eu") == "payments"
    # Every profile the example's rules name exists (Config checks it; this pins the file).
    assert {rule.profile for rule in c.topics} <= set(c.profiles)
    assert c.daemon.socket_mode == 0o660


def test_load_names_the_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[profiles.clicks]\nlingr_ms = 10\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: profiles\.clicks\.lingr_ms: unknown key"):
        load(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "missing.toml")


def test_invalid_toml_and_utf8(tmp_path: pathlib.Path) -> None:
    assert "not valid TOML" in refused("x = [")
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"# caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load(path)


# --- unknown keys and bad types ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[profiles.clicks]\nlingr_ms = 1", "profiles.clicks.lingr_ms"),
        ("[profiles.mine]\nacks = 1\ncompresion_type = 'gzip'", "profiles.mine.compresion_type"),
        ("[daemon]\nsocket = '/x'", "daemon.socket"),
        ("[kafka]\nbootstrap_server = 'a:1'", "kafka.bootstrap_server"),
        ("[[topics]]\nmatch = 'a'\nprofile = 'default'\nprio = 1", "topics[0].prio"),
        ("[deamon]\nworkers = 1", "deamon"),
    ],
)
def test_unknown_key_refused_with_its_path(text: str, key: str) -> None:
    message = refused(text)
    assert message.startswith(f"test.toml: {key}: unknown key")


def test_unknown_key_suggests_the_close_one() -> None:
    assert "did you mean 'linger_ms'" in refused("[profiles.clicks]\nlingr_ms = 1")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[daemon]\nworkers = 'four'", "daemon.workers"),
        ("[daemon]\nworkers = -1", "daemon.workers"),
        ("[daemon]\npin_workers = 'yes'", "daemon.pin_workers"),
        ("[daemon]\nallowed_uids = [-1]", "daemon.allowed_uids[0]"),
        ("[daemon]\nlog_level = 'chatty'", "daemon.log_level"),
        ("[daemon]\nmetrics_port = 70000", "daemon.metrics_port"),
        ("[kafka]\nbuffer_memory = 10", "kafka.buffer_memory"),
        ("[profiles.x]\nlinger_ms = 1.5", "profiles.x.linger_ms"),
        ("[profiles.x]\ncompression_type = 'brotli'", "profiles.x.compression_type"),
        ("[profiles.x]\non_full = 'wait'", "profiles.x.on_full"),
        ("profiles = 3", "profiles"),
        ("[profiles]\nx = 3", "profiles.x"),
        ("daemon = [1]", "daemon"),
        ("topics = 3", "topics"),
        ("topics = [3]", "topics[0]"),
        ("[[topics]]\nmatch = 'a'", "topics[0].profile"),
        ("[[topics]]\nmatch = ''\nprofile = 'default'", "topics[0].match"),
    ],
)
def test_bad_values_name_the_key(text: str, key: str) -> None:
    assert refused(text).startswith(f"test.toml: {key}: ")


# --- acks and socket_mode normalisation --------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "acks"),
    [('"all"', -1), ('"ALL"', -1), ('"-1"', -1), ("-1", -1), ("0", 0), ('"0"', 0), ("1", 1), ('"1"', 1)],
)
def test_acks_normalised(written: str, acks: int) -> None:
    c = loads(f"[profiles.p]\nacks = {written}\n")
    assert c.profiles["p"].acks == acks
    assert type(c.profiles["p"].acks) is int


@pytest.mark.parametrize("written", ['"most"', "2", "true", "[1]", '""'])
def test_bad_acks_refused(written: str) -> None:
    assert refused(f"[profiles.p]\nacks = {written}\n").startswith("test.toml: profiles.p.acks: ")


def test_idempotence_left_out_follows_acks_like_kafka() -> None:
    c = loads("[profiles.p]\nacks = 1\n[profiles.q]\nacks = 'all'\n[profiles.default]\nacks = 0\n")
    assert not c.profiles["p"].enable_idempotence
    assert c.profiles["q"].enable_idempotence
    assert not c.profiles["default"].enable_idempotence


@pytest.mark.parametrize(
    ("written", "mode"), [('"0660"', 0o660), ('"660"', 0o660), ('"0o600"', 0o600), ("0o640", 0o640), ("432", 0o660)]
)
def test_socket_mode_forms(written: str, mode: int) -> None:
    assert loads(f"[daemon]\nsocket_mode = {written}\n").daemon.socket_mode == mode


@pytest.mark.parametrize("written", ["660", '"0999"', '"rw-rw----"', '""', "true", '"07777"'])
def test_bad_socket_mode_refused(written: str) -> None:
    assert refused(f"[daemon]\nsocket_mode = {written}\n").startswith("test.toml: daemon.socket_mode: ")


def test_log_level_case_insensitive() -> None:
    assert loads("[daemon]\nlog_level = 'DEBUG'").daemon.log_level == "debug"


# --- profiles: override and extend --------------------------------------------------------------


def test_builtin_override_merges_onto_the_builtin() -> None:
    c = loads("[profiles.clicks]\nlinger_ms = 200\n")
    clicks = c.profiles["clicks"]
    assert clicks.linger_ms == 200
    # The keys not written keep the built-in clicks values, not Kafka's defaults.
    assert (clicks.acks, clicks.compression_type, clicks.on_full) == (1, "zstd", "drop")


def test_new_profile_starts_from_kafka_defaults() -> None:
    c = loads("[profiles.audit]\nlinger_ms = 20\n")
    assert c.profiles["audit"] == Profile(linger_ms=20)
    assert set(c.profiles) == {"default", "payments", "clicks", "audit"}


def test_config_built_in_python_keeps_builtins() -> None:
    c = Config(profiles={"mine": Profile(acks=0, enable_idempotence=False)})
    assert set(c.profiles) == {"default", "payments", "clicks", "mine"}
    assert c.profiles["payments"] == BUILTIN_PROFILES["payments"]


# --- topic rules ------------------------------------------------------------------------------

RULES = """
[profiles.audit]
linger_ms = 0

[[topics]]
match = "payments.refunds"
profile = "audit"

[[topics]]
match = "payments.*"
profile = "payments"

[[topics]]
match = "payments.refunds"
profile = "clicks"

[[topics]]
match = "clicks-??"
profile = "clicks"

[[topics]]
match = "eu[12].*"
profile = "payments"
"""


@pytest.mark.parametrize(
    ("topic", "profile"),
    [
        ("payments.refunds", "audit"),  # first match wins over the later exact rule
        ("payments.eu", "payments"),
        ("payments", "default"),
        ("clicks-01", "clicks"),
        ("clicks-001", "default"),
        ("eu1.orders", "payments"),
        ("eu3.orders", "default"),
        ("PAYMENTS.eu", "default"),  # topic names are case-sensitive
        ("other", "default"),
    ],
)
def test_rules_first_match_and_fallback(topic: str, profile: str) -> None:
    c = loads(RULES)
    assert c.profile_name_for(topic) == profile
    assert c.profile_for(topic) is c.profiles[profile]
    # Cached answers equal fresh ones.
    assert c.profile_name_for(topic) == profile


def test_exact_rule_is_not_a_prefix_match() -> None:
    c = Config(topics=(TopicRule(match="orders", profile="payments"),))
    assert c.profile_name_for("orders") == "payments"
    assert c.profile_name_for("orders2") == "default"


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="abc.-_*?", min_size=1, max_size=6), st.text(alphabet="abc.-_", max_size=8))
def test_rules_agree_with_fnmatchcase(pattern: str, topic: str) -> None:
    import fnmatch

    c = Config(topics=(TopicRule(match=pattern, profile="clicks"),))
    expected = "clicks" if fnmatch.fnmatchcase(topic, pattern) else "default"
    assert c.profile_name_for(topic) == expected


def test_profile_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cfg, "_CACHE_LIMIT", 8)
    c = loads(RULES)
    for i in range(50):
        assert c.profile_for(f"payments.t{i}") is c.profiles["payments"]
    assert len(c.__dict__["_profile_cache"]) <= 8
    assert len(c.__dict__["_name_cache"]) <= 8


# --- cross-field rules ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key", "why"),
    [
        ("[profiles.x]\nacks = 1\nenable_idempotence = true", "profiles.x.enable_idempotence", "acks = all"),
        ("[profiles.payments]\nacks = 0", "profiles.payments.enable_idempotence", "acks = all"),
        (
            "[kafka]\nmax_in_flight_requests_per_connection = 6",
            "profiles.payments.enable_idempotence",
            "max_in_flight_requests_per_connection <= 5",
        ),
        ("[profiles.x]\nbatch_size = 2000\nmax_request_size = 1000", "profiles.x.batch_size", "max_request_size"),
        ("[profiles.x]\ndelivery_timeout_ms = 1000", "profiles.x.delivery_timeout_ms", "linger_ms + request_timeout_ms"),
        ("[profiles.x]\nretry_backoff_ms = 5000", "profiles.x.retry_backoff_ms", "retry_backoff_max_ms"),
        ("[kafka]\nreconnect_backoff_ms = 5000", "kafka.reconnect_backoff_ms", "reconnect_backoff_max_ms"),
        ("[daemon]\nrequest_ring_bytes = 3000000", "daemon.request_ring_bytes", "power of two"),
        ("[daemon]\ncompletion_ring_bytes = 12288", "daemon.completion_ring_bytes", "power of two"),
        ("[daemon]\nrequest_ring_bytes = 1048576", "profiles.default.max_request_size", "request ring"),
        (
            "[kafka]\nbuffer_memory = 1048576\n[profiles.big]\nmax_request_size = 2000000",
            "profiles.big.max_request_size",
            "buffer_memory",
        ),
        ("[daemon]\nsocket_path = 'sluice.sock'", "daemon.socket_path", "absolute"),
        ("[daemon]\nsocket_path = '/" + "x" * 120 + "'", "daemon.socket_path", "107 bytes"),
        ("[daemon]\nruntime_dir = 'run'", "daemon.runtime_dir", "absolute"),
        ("[[topics]]\nmatch = 'a'\nprofile = 'nope'", "topics[0].profile", "no profile named 'nope'"),
        ("[profiles.'bad name']\nlinger_ms = 1", "profiles.bad name", "profile name"),
    ],
)
def test_cross_field_rules(text: str, key: str, why: str) -> None:
    message = refused(text)
    assert message.startswith(f"test.toml: {key}: "), message
    assert why in message


def test_max_in_flight_above_five_turns_implicit_idempotence_off() -> None:
    c = loads(
        "[kafka]\nmax_in_flight_requests_per_connection = 10\n"
        "[profiles.payments]\nenable_idempotence = false\n"
    )
    assert not c.profiles["default"].enable_idempotence
    assert not c.profiles["payments"].enable_idempotence


def test_python_construction_is_checked_too() -> None:
    with pytest.raises(ConfigError, match=r"^profiles\.p\.enable_idempotence: "):
        Config(profiles={"p": Profile(acks=1)})
    with pytest.raises(ConfigError, match=r"^request_ring_bytes: "):
        DaemonSettings(request_ring_bytes=100_000)
    with pytest.raises(ConfigError, match=r"^topics\[0\]\.profile: "):
        Config(topics=(TopicRule(match="a", profile="nope"),))


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        loads("[daemon]\nworkers = -3")


# --- daemon helpers ------------------------------------------------------------------------------


def test_worker_count_and_runtime_path() -> None:
    import psutil

    auto = DaemonSettings()
    assert auto.worker_count() == len(psutil.Process().cpu_affinity())
    assert DaemonSettings(workers=3).worker_count() == 3
    assert auto.runtime_path() == "/run/sluice"
    assert DaemonSettings(runtime_dir="/var/lib/sluice").runtime_path() == "/var/lib/sluice"


def test_config_is_frozen() -> None:
    c = loads("")
    with pytest.raises(AttributeError):
        c.daemon = DaemonSettings()  # type: ignore[misc]
    with pytest.raises(AttributeError):
        c.profiles["default"].acks = 1  # type: ignore[misc]


# --- reload diff ---------------------------------------------------------------------------------


def test_diff_live_classifies_changes() -> None:
    old = loads("")
    new = loads(
        """
[daemon]
log_level = "debug"
workers = 4
socket_path = "/tmp/other.sock"
allowed_uids = [1000]
[kafka]
bootstrap_servers = "broker:9092"
[profiles.clicks]
linger_ms = 500
batch_size = 65536
[profiles.payments]
enable_idempotence = false
acks = 1
[profiles.audit]
linger_ms = 0
[[topics]]
match = "a.*"
profile = "audit"
"""
    )
    d = diff_live(old, new)
    assert set(d.live) == {
        "daemon.log_level",
        "daemon.allowed_uids",
        "profiles.clicks.linger_ms",
        "profiles.clicks.batch_size",
        "profiles.payments.acks",
        "profiles.audit",
        "topics",
    }
    assert set(d.restart) == {
        "daemon.workers",
        "daemon.socket_path",
        "kafka.bootstrap_servers",
        "profiles.payments.enable_idempotence",
    }
    assert d.changed and d.needs_restart


def test_diff_live_of_equal_configs_is_empty() -> None:
    d = diff_live(loads(""), Config())
    assert not d.changed and not d.needs_restart
    assert diff_live(loads(""), loads("[daemon]\nruntime_dir = '/srv'")).restart == ("daemon.runtime_dir",)


def test_config_round_trips_through_msgspec_builtins() -> None:
    # The daemon passes its Config to worker processes; it must survive to_builtins/convert.
    c = loads(RULES)
    again = msgspec.convert(msgspec.to_builtins(c), Config)
    assert again == c
    assert again.profile_name_for("payments.refunds") == "audit"


def test_config_pickles_for_worker_processes() -> None:
    import pickle

    c = loads(RULES)
    c.profile_for("payments.x")  # a warm cache must not break pickling
    again = pickle.loads(pickle.dumps(c))
    assert again == c
    assert again.profile_name_for("payments.refunds") == "audit"
    assert again.profile_for("clicks-07") == again.profiles["clicks"]
