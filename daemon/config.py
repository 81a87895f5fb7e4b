"""Sluice's configuration: TOML decoded into frozen msgspec Structs.

One Struct per TOML section::

    [daemon]            -> DaemonSettings   (socket, workers, rings, logging, access)
    [kafka]             -> KafkaSettings    (connection-level producer settings)
    [profiles.NAME]     -> Profile          (how a topic's records are delivered)
    [[topics]]          -> TopicRule        (topic name or glob -> profile name)

Producer settings keep Kafka's property names (dots become underscores) and Kafka's defaults.
Three profiles are built in (``default``, ``payments``, ``clicks``); a config may override
their keys or add profiles of its own. ``docs/CONFIG.md`` lists every key.

Security to the brokers (``security_protocol``, ``ssl_*``, ``sasl_*`` in ``[kafka]``) keeps
Kafka's names too; :func:`_validate_security` refuses the combinations that cannot work (TLS
keys without TLS, SASL keys without SASL, a mechanism without its credentials, a secret given
both inline and as a file). Secrets policy: every secret has a ``*_file`` form (read when a
connection opens, a relative path under systemd's ``$CREDENTIALS_DIRECTORY``, see
:mod:`daemon.security`); a secret written inline is accepted only from a file no other user can
read (``mode & 0o077 == 0``), checked by :func:`loads` whenever its ``source`` is a file.

Every refusal is a :class:`~shm.errors.ConfigError` whose message names the file, the key's
path (``profiles.clicks.lingr_ms``) and the reason. Cross-field rules (idempotence needs
``acks = all``, ``batch_size <= max_request_size``, ring sizes are powers of two, ...) are
checked by :class:`Config` itself, so a Config built in Python is held to the same rules as
one loaded from a file.
"""

from __future__ import annotations

import difflib
import fnmatch
import os
import re
import tomllib
import typing
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec
import psutil

from shm.errors import ConfigError

__all__ = [
    "Profile",
    "KafkaSettings",
    "DaemonSettings",
    "TopicRule",
    "Config",
    "ConfigDiff",
    "BUILTIN_PROFILES",
    "DEFAULT_CONFIG_PATH",
    "EXIT_CONFIG",
    "load",
    "loads",
    "diff_live",
]

DEFAULT_CONFIG_PATH = "/etc/sluice/sluice.toml"
# The exit status for a config that cannot be read or is refused (sysexits.h EX_CONFIG). The
# systemd unit lists it in RestartPreventExitStatus, so a bad config does not restart in a loop.
EXIT_CONFIG = 78

Compression = Literal["none", "gzip", "snappy", "lz4", "zstd"]
SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"]
LogLevel = Literal["debug", "info", "warning", "error", "critical"]

_KiB = 1024
_MiB = 1024 * 1024

# Bytes a record costs in a request ring besides its body: the 8-byte frame header plus the
# 16-byte RECORD header (topic_id, flags, partition, timestamp). A record of max_request_size
# must fit in one ring, or a client could never send it.
_RING_RECORD_OVERHEAD = 8 + 16
# Kafka refuses idempotence with more than 5 requests in flight per connection: the broker
# keeps the last 5 batches' sequence numbers per producer and partition.
_IDEMPOTENT_MAX_IN_FLIGHT = 5
# sockaddr_un.sun_path is 108 bytes including the terminating NUL on Linux.
_SUN_PATH_MAX = 107
_PROFILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
# Rules whose pattern holds none of these are exact names; Kafka topic names cannot contain
# them, so the two kinds never collide.
_GLOB_CHARS = frozenset("*?[")
# profile_for() caches per topic; a client that looks up endless distinct names must not grow
# the daemon without bound, so the cache is dropped when it reaches this size.
_CACHE_LIMIT = 65_536


class Profile(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """How the records of a topic are delivered. Named profiles map topics to these.

    In TOML ``acks`` also accepts ``"all"`` and the strings ``"-1"``, ``"0"``, ``"1"``; the
    field always holds -1, 0 or 1.
    """

    # 0 = no ack, 1 = leader, -1 = all in-sync replicas ("all" in TOML).
    acks: Literal[0, 1, -1] = -1
    enable_idempotence: bool = True
    linger_ms: Annotated[int, msgspec.Meta(ge=0, le=60_000)] = 5
    batch_size: Annotated[int, msgspec.Meta(ge=1, le=64 * 1024 * 1024)] = 16_384
    compression_type: Compression = "none"
    delivery_timeout_ms: Annotated[int, msgspec.Meta(ge=1)] = 120_000
    request_timeout_ms: Annotated[int, msgspec.Meta(ge=1)] = 30_000
    retry_backoff_ms: Annotated[int, msgspec.Meta(ge=0)] = 100
    retry_backoff_max_ms: Annotated[int, msgspec.Meta(ge=0)] = 1_000
    max_request_size: Annotated[int, msgspec.Meta(ge=1)] = 1_048_576
    # What a client does when its ring is full: wait up to max_block_ms then raise
    # BufferFullError, or drop the record and count it.
    on_full: Literal["block", "drop"] = "block"
    max_block_ms: Annotated[int, msgspec.Meta(ge=0)] = 60_000


class KafkaSettings(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Connection-level producer settings shared by every profile."""

    bootstrap_servers: str = "127.0.0.1:9092"
    client_id: str = "sluice"
    max_in_flight_requests_per_connection: Annotated[int, msgspec.Meta(ge=1, le=100)] = 5
    metadata_max_age_ms: Annotated[int, msgspec.Meta(ge=1)] = 300_000
    socket_connection_setup_timeout_ms: Annotated[int, msgspec.Meta(ge=1)] = 10_000
    reconnect_backoff_ms: Annotated[int, msgspec.Meta(ge=0)] = 50
    reconnect_backoff_max_ms: Annotated[int, msgspec.Meta(ge=0)] = 1_000
    # Bytes of batches one worker may hold in its arena before it stops draining rings.
    buffer_memory: Annotated[int, msgspec.Meta(ge=1024 * 1024)] = 33_554_432
    # Security to the brokers (docs/CONFIG.md, "Security"). TLS keys apply to SSL and SASL_SSL.
    security_protocol: SecurityProtocol = "PLAINTEXT"
    # PEM CA bundle the brokers' certificates must chain to; empty = the system's trust store.
    ssl_ca_location: str = ""
    # Mutual TLS: the client certificate (PEM, may hold the key too) and its private key.
    ssl_certificate_location: str = ""
    ssl_key_location: str = ""
    ssl_key_password: str = ""
    ssl_key_password_file: str = ""
    # "https": the broker's certificate must name the host connected to; "none": not checked.
    ssl_endpoint_identification_algorithm: Literal["https", "none"] = "https"
    sasl_mechanism: SaslMechanism = ""
    sasl_username: str = ""
    sasl_password: str = ""
    sasl_password_file: str = ""
    # OAUTHBEARER: the token (a JWT) from a file or from a command's standard output, fetched
    # again before it expires (its exp claim, else this lifetime).
    sasl_oauthbearer_token_file: str = ""
    sasl_oauthbearer_token_command: str = ""
    sasl_oauthbearer_token_lifetime_ms: Annotated[int, msgspec.Meta(ge=1000)] = 3_600_000

    def uses_tls(self) -> bool:
        """Whether connections to the brokers are TLS (SSL or SASL_SSL)."""
        return self.security_protocol in ("SSL", "SASL_SSL")

    def uses_sasl(self) -> bool:
        """Whether connections authenticate with SASL (SASL_PLAINTEXT or SASL_SSL)."""
        return self.security_protocol.startswith("SASL_")

    def inline_secrets(self) -> list[str]:
        """The secret keys written inline (not as ``*_file``), for the file-mode check."""
        return [k for k in _INLINE_SECRETS if getattr(self, k)]


# Keys that hold a secret when set inline; each has a *_file form.
_INLINE_SECRETS = ("sasl_password", "ssl_key_password")
_SSL_KEYS = ("ssl_ca_location", "ssl_certificate_location", "ssl_key_location", "ssl_key_password",
             "ssl_key_password_file")
_SASL_KEYS = ("sasl_mechanism", "sasl_username", "sasl_password", "sasl_password_file",
              "sasl_oauthbearer_token_file", "sasl_oauthbearer_token_command")
_USER_PASSWORD_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


class DaemonSettings(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """The ``[daemon]`` section: the socket, the workers, the rings, logging and access.

    In TOML ``socket_mode`` is best written as an octal string (``"0660"``); a TOML octal
    integer (``0o660``) is accepted too. The field always holds the integer mode.
    """

    socket_path: str = "/run/sluice/sluice.sock"
    socket_mode: Annotated[int, msgspec.Meta(ge=0, le=0o777)] = 0o660
    # 0 = one worker per CPU this process may run on (its affinity mask, not the host's count).
    workers: Annotated[int, msgspec.Meta(ge=0, le=1024)] = 0
    pin_workers: bool = False
    # Where the worker arenas live; empty = the socket's directory (systemd's RuntimeDirectory).
    runtime_dir: str = ""
    # Per client and per worker; the client's segment holds one pair of rings per worker.
    request_ring_bytes: Annotated[int, msgspec.Meta(ge=64 * _KiB, le=1024 * _MiB)] = 4 * _MiB
    completion_ring_bytes: Annotated[int, msgspec.Meta(ge=4 * _KiB, le=64 * _MiB)] = 256 * _KiB
    log_level: LogLevel = "info"
    # SIGTERM: how long to drain rings, flush and wait for acks before exiting anyway.
    shutdown_timeout_ms: Annotated[int, msgspec.Meta(ge=0)] = 30_000
    # SO_PEERCRED allow-lists; both empty = anyone who can open the socket (its mode decides).
    allowed_uids: tuple[Annotated[int, msgspec.Meta(ge=0)], ...] = ()
    allowed_gids: tuple[Annotated[int, msgspec.Meta(ge=0)], ...] = ()
    # A topic Kafka does not have is remembered this long: lookups and Produce frames to it fail
    # at once instead of waiting for Kafka's metadata each time. 0 = ask Kafka every time.
    unknown_topic_cache_ms: Annotated[int, msgspec.Meta(ge=0, le=3_600_000)] = 2_000
    # Prometheus text metrics over HTTP; 0 = off.
    metrics_port: Annotated[int, msgspec.Meta(ge=0, le=65_535)] = 0
    metrics_address: str = "127.0.0.1"

    def __post_init__(self) -> None:
        for key in ("request_ring_bytes", "completion_ring_bytes"):
            size = getattr(self, key)
            # The rings index their data area with a mask, so only powers of two work.
            if size & (size - 1):
                raise _Invalid(key, f"{size} is not a power of two")
        if not os.path.isabs(self.socket_path):
            raise _Invalid("socket_path", f"{self.socket_path!r} is not an absolute path")
        if len(os.fsencode(self.socket_path)) > _SUN_PATH_MAX:
            raise _Invalid("socket_path", f"longer than the {_SUN_PATH_MAX} bytes a Unix socket path may have")
        if self.runtime_dir and not os.path.isabs(self.runtime_dir):
            raise _Invalid("runtime_dir", f"{self.runtime_dir!r} is not an absolute path")

    def worker_count(self) -> int:
        """The number of workers to run: ``workers``, or the usable CPUs when it is 0."""
        if self.workers:
            return self.workers
        try:
            return max(1, len(psutil.Process().cpu_affinity()))
        except (AttributeError, NotImplementedError):  # platforms without affinity (macOS)
            return os.cpu_count() or 1

    def runtime_path(self) -> str:
        """The directory for worker arenas: ``runtime_dir`` or the socket's directory."""
        return self.runtime_dir or os.path.dirname(self.socket_path)


class TopicRule(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """One ``[[topics]]`` rule: topics named ``match`` (exact, or an fnmatch glob) use ``profile``."""

    match: Annotated[str, msgspec.Meta(min_length=1)]
    profile: str

    def is_glob(self) -> bool:
        """Whether ``match`` is a glob (holds ``*``, ``?`` or ``[``) rather than an exact name."""
        return not _GLOB_CHARS.isdisjoint(self.match)


class _Invalid(ConfigError):
    """A refusal that knows its key, so the loader can prefix the section and the file."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


# Built-in profiles as the TOML tables they would be: the keys written here count as set
# explicitly (see _profile for why that matters to enable_idempotence).
_BUILTIN_TABLES: dict[str, dict[str, Any]] = {
    # Kafka's own producer defaults: acks all, idempotent (unless acks or max_in_flight rule
    # it out), linger 5 ms, block when full.
    "default": {},
    # Never lose, never duplicate; latency is cheap.
    "payments": {"acks": -1, "enable_idempotence": True, "on_full": "block", "linger_ms": 5},
    # Loss or duplicates are tolerable, a slow send() is not.
    "clicks": {
        "acks": 1,
        "enable_idempotence": False,
        "linger_ms": 50,
        "compression_type": "zstd",
        "on_full": "drop",
    },
}

BUILTIN_PROFILES: Mapping[str, Profile] = {
    name: Profile(**table) for name, table in _BUILTIN_TABLES.items()
}
"""The profiles every Config has unless it overrides them."""


class Config(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True, dict=True):
    """The whole configuration.

    ``profiles`` always holds the built-in profiles (``default``, ``payments``, ``clicks``)
    besides the configured ones. Construction checks the cross-field rules and raises
    :class:`~shm.errors.ConfigError` naming the key.
    """

    daemon: DaemonSettings = DaemonSettings()
    kafka: KafkaSettings = KafkaSettings()
    profiles: dict[str, Profile] = {}
    topics: tuple[TopicRule, ...] = ()

    def __post_init__(self) -> None:
        if BUILTIN_PROFILES.keys() - self.profiles.keys():
            msgspec.structs.force_setattr(self, "profiles", {**BUILTIN_PROFILES, **self.profiles})
        _validate(self)
        # Per-instance caches; a reload builds a new Config, so they never go stale.
        rules = []
        for rule in self.topics:
            if rule.is_glob():
                rules.append((None, re.compile(fnmatch.translate(rule.match)).match, rule.profile))
            else:
                rules.append((rule.match, None, rule.profile))
        self.__dict__["_rules"] = tuple(rules)
        self.__dict__["_name_cache"] = {}
        self.__dict__["_profile_cache"] = {}

    def profile_name_for(self, topic: str) -> str:
        """The name of the profile for ``topic``: the first matching rule's, else ``default``."""
        cache: dict[str, str] = self.__dict__["_name_cache"]
        name = cache.get(topic)
        if name is None:
            name = "default"
            for exact, match, profile in self.__dict__["_rules"]:
                if match is None:
                    if topic == exact:
                        name = profile
                        break
                elif match(topic) is not None:
                    name = profile
                    break
            if len(cache) >= _CACHE_LIMIT:
                cache.clear()
            cache[topic] = name
        return name

    def profile_for(self, topic: str) -> Profile:
        """The :class:`Profile` for ``topic`` (cached per topic; a dict lookup when warm)."""
        cache: dict[str, Profile] = self.__dict__["_profile_cache"]
        profile = cache.get(topic)
        if profile is None:
            profile = self.profiles[self.profile_name_for(topic)]
            if len(cache) >= _CACHE_LIMIT:
                cache.clear()
            cache[topic] = profile
        return profile


def _validate(config: Config) -> None:
    """The rules that span fields or sections; raises _Invalid with the key's full path."""
    daemon, kafka = config.daemon, config.kafka
    for name, profile in config.profiles.items():
        if not _PROFILE_NAME.match(name):
            raise _Invalid(f"profiles.{name}", "a profile name is letters, digits, '_', '.' or '-'")
        key = f"profiles.{name}"
        if profile.enable_idempotence and profile.acks != -1:
            raise _Invalid(
                f"{key}.enable_idempotence",
                f"idempotence requires acks = all (-1), but this profile has acks = {profile.acks}"
                " (set enable_idempotence = false, or leave it out so it follows acks)",
            )
        if profile.enable_idempotence and kafka.max_in_flight_requests_per_connection > _IDEMPOTENT_MAX_IN_FLIGHT:
            raise _Invalid(
                f"{key}.enable_idempotence",
                "idempotence requires kafka.max_in_flight_requests_per_connection <= "
                f"{_IDEMPOTENT_MAX_IN_FLIGHT}, but it is {kafka.max_in_flight_requests_per_connection}",
            )
        if profile.batch_size > profile.max_request_size:
            raise _Invalid(
                f"{key}.batch_size",
                f"{profile.batch_size} exceeds max_request_size ({profile.max_request_size}): "
                "a full batch could never be sent",
            )
        if profile.delivery_timeout_ms < profile.linger_ms + profile.request_timeout_ms:
            raise _Invalid(
                f"{key}.delivery_timeout_ms",
                f"{profile.delivery_timeout_ms} is less than linger_ms + request_timeout_ms "
                f"({profile.linger_ms + profile.request_timeout_ms}); Kafka requires at least that",
            )
        if profile.retry_backoff_ms > profile.retry_backoff_max_ms:
            raise _Invalid(
                f"{key}.retry_backoff_ms",
                f"{profile.retry_backoff_ms} exceeds retry_backoff_max_ms ({profile.retry_backoff_max_ms})",
            )
        if profile.max_request_size + _RING_RECORD_OVERHEAD > daemon.request_ring_bytes:
            raise _Invalid(
                f"{key}.max_request_size",
                f"{profile.max_request_size} does not fit in one request ring "
                f"(daemon.request_ring_bytes = {daemon.request_ring_bytes}, less "
                f"{_RING_RECORD_OVERHEAD} bytes of frame headers)",
            )
        if profile.max_request_size > kafka.buffer_memory:
            raise _Invalid(
                f"{key}.max_request_size",
                f"{profile.max_request_size} exceeds kafka.buffer_memory ({kafka.buffer_memory}): "
                "such a batch could never fit in a worker's arena",
            )
    if kafka.reconnect_backoff_ms > kafka.reconnect_backoff_max_ms:
        raise _Invalid(
            "kafka.reconnect_backoff_ms",
            f"{kafka.reconnect_backoff_ms} exceeds reconnect_backoff_max_ms ({kafka.reconnect_backoff_max_ms})",
        )
    _validate_security(kafka)
    for i, rule in enumerate(config.topics):
        if rule.profile not in config.profiles:
            known = ", ".join(sorted(config.profiles))
            raise _Invalid(f"topics[{i}].profile", f"no profile named {rule.profile!r} (known: {known})")


def _validate_security(kafka: KafkaSettings) -> None:
    """The [kafka] security combinations that cannot work; raises _Invalid naming the key."""
    protocol = kafka.security_protocol
    if not kafka.uses_tls():
        for key in _SSL_KEYS:
            if getattr(kafka, key):
                raise _Invalid(f"kafka.{key}", f"is set, but security_protocol = {protocol} does not use TLS "
                               "(use SSL or SASL_SSL)")
    for inline in _INLINE_SECRETS:
        if getattr(kafka, inline) and getattr(kafka, f"{inline}_file"):
            raise _Invalid(f"kafka.{inline}_file", f"and kafka.{inline} are both set; give the secret one way")
    if kafka.ssl_key_location and not kafka.ssl_certificate_location:
        raise _Invalid("kafka.ssl_key_location", "is set without ssl_certificate_location (mutual TLS needs both)")
    if (kafka.ssl_key_password or kafka.ssl_key_password_file) and not kafka.ssl_certificate_location:
        raise _Invalid("kafka.ssl_key_password", "is set, but there is no client key (ssl_certificate_location)")
    if not kafka.uses_sasl():
        for key in _SASL_KEYS:
            if getattr(kafka, key):
                raise _Invalid(f"kafka.{key}", f"is set, but security_protocol = {protocol} does not use SASL "
                               "(use SASL_SSL or SASL_PLAINTEXT)")
        return
    mechanism = kafka.sasl_mechanism
    if not mechanism:
        raise _Invalid("kafka.sasl_mechanism", f"is required with security_protocol = {protocol} "
                       "(PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER)")
    if mechanism in _USER_PASSWORD_MECHANISMS:
        if not kafka.sasl_username:
            raise _Invalid("kafka.sasl_username", f"is required with sasl_mechanism = {mechanism}")
        if not (kafka.sasl_password or kafka.sasl_password_file):
            raise _Invalid("kafka.sasl_password", f"is required with sasl_mechanism = {mechanism} "
                           "(or sasl_password_file)")
        for key in ("sasl_oauthbearer_token_file", "sasl_oauthbearer_token_command"):
            if getattr(kafka, key):
                raise _Invalid(f"kafka.{key}", f"applies to OAUTHBEARER only, not {mechanism}")
    else:
        if bool(kafka.sasl_oauthbearer_token_file) == bool(kafka.sasl_oauthbearer_token_command):
            raise _Invalid("kafka.sasl_oauthbearer_token_file",
                           "OAUTHBEARER needs exactly one of sasl_oauthbearer_token_file and "
                           "sasl_oauthbearer_token_command")
        for key in ("sasl_username", "sasl_password", "sasl_password_file"):
            if getattr(kafka, key):
                raise _Invalid(f"kafka.{key}", "does not apply to OAUTHBEARER (the token names the principal)")


def _check_secret_mode(config: Config, source: str) -> None:
    """Refuse an inline secret in a file other users can read (the secrets policy above)."""
    secrets = config.kafka.inline_secrets()
    if not secrets:
        return
    try:
        mode = os.stat(source).st_mode
    except OSError:
        return  # not a file (a string given to loads): nothing to protect
    if mode & 0o077:
        raise ConfigError(
            f"{source}: kafka.{secrets[0]}: a secret is written inline, but the file is readable by "
            f"other users (mode {mode & 0o777:04o}); chmod 0600 it, or move the secret to "
            f"{secrets[0]}_file (a systemd credential, docs/OPERATIONS.md)"
        )


# --- loading --------------------------------------------------------------------------------

_SECTIONS = ("daemon", "kafka", "profiles", "topics")
_ACKS = {"all": -1, "-1": -1, "0": 0, "1": 1, -1: -1, 0: 0, 1: 1}
_UNKNOWN_FIELD = re.compile(r"Object contains unknown field `(.*)`\Z")
_MISSING_FIELD = re.compile(r"Object missing required field `(.*)`\Z")


def load(path: str | os.PathLike[str]) -> Config:
    """Read and check the TOML file at ``path``.

    Raises:
        ConfigError: the file cannot be read, is not TOML, or a key is refused; the message
            names the file, the key's path and the reason.
    """
    source = os.fspath(path)
    try:
        with open(source, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"{source}: cannot read: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{source}: not UTF-8 at byte {e.start}") from None
    return loads(text, source=source)


def loads(text: str, source: str = "<string>") -> Config:
    """Check a TOML document and return its :class:`Config`.

    ``source`` names the document in error messages (usually its file name). When ``source``
    is a file and the config holds a secret inline, the file must not be readable by other users.
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    try:
        config = _build(raw)
    except _Invalid as e:
        raise ConfigError(f"{source}: {e.key}: {e.reason}") from None
    _check_secret_mode(config, source)
    return config


def _build(raw: dict[str, Any]) -> Config:
    for key in raw:
        if key not in _SECTIONS:
            raise _Invalid(key, _unknown_reason(key, _SECTIONS))
    daemon_table = dict(_table(raw, "daemon", "daemon"))
    if "socket_mode" in daemon_table:
        daemon_table["socket_mode"] = _socket_mode(daemon_table["socket_mode"])
    if isinstance(daemon_table.get("log_level"), str):
        daemon_table["log_level"] = daemon_table["log_level"].lower()
    daemon = _convert(daemon_table, DaemonSettings, "daemon")
    kafka_table = dict(_table(raw, "kafka", "kafka"))
    for key, kind in (("security_protocol", SecurityProtocol), ("sasl_mechanism", SaslMechanism)):
        # Kafka reads these without regard to case.
        if isinstance(kafka_table.get(key), str):
            kafka_table[key] = kafka_table[key].upper()
            allowed = [v for v in typing.get_args(kind) if v]
            if kafka_table[key] not in allowed:
                raise _Invalid(f"kafka.{key}", f"{kafka_table[key]!r} is not one of {', '.join(allowed)}")
    if kafka_table.get("ssl_endpoint_identification_algorithm") == "":
        # Kafka's own spelling of "no hostname check" is the empty string.
        kafka_table["ssl_endpoint_identification_algorithm"] = "none"
    kafka = _convert(kafka_table, KafkaSettings, "kafka")

    user_profiles = _table(raw, "profiles", "profiles")
    profiles: dict[str, Profile] = {}
    for name in {**_BUILTIN_TABLES, **user_profiles}:
        user = _table(user_profiles, name, f"profiles.{name}") if name in user_profiles else {}
        profiles[name] = _profile(name, {**_BUILTIN_TABLES.get(name, {}), **user}, kafka)

    rules = raw.get("topics", [])
    if not isinstance(rules, list):
        raise _Invalid("topics", "must be an array of tables: [[topics]] match = ..., profile = ...")
    topics = tuple(_convert(rule, TopicRule, f"topics[{i}]") for i, rule in enumerate(rules))
    return Config(daemon=daemon, kafka=kafka, profiles=profiles, topics=topics)


def _profile(name: str, table: dict[str, Any], kafka: KafkaSettings) -> Profile:
    key = f"profiles.{name}"
    if "acks" in table:
        table["acks"] = _acks(table["acks"], f"{key}.acks")
    if "enable_idempotence" not in table:
        # As in Kafka's producer: idempotence left unset follows the settings that allow it,
        # and only an explicit `enable_idempotence = true` that conflicts is an error.
        table["enable_idempotence"] = (
            table.get("acks", -1) == -1
            and kafka.max_in_flight_requests_per_connection <= _IDEMPOTENT_MAX_IN_FLIGHT
        )
    return _convert(table, Profile, key)


def _acks(value: Any, key: str) -> int:
    # bool is an int in Python; `acks = true` is a mistake, not 1.
    if not isinstance(value, bool) and isinstance(value, (int, str)):
        acks = _ACKS.get(value.lower() if isinstance(value, str) else value)
        if acks is not None:
            return acks
    raise _Invalid(key, f"{value!r} is not one of \"all\", -1, 0, 1")


def _socket_mode(value: Any) -> Any:
    if isinstance(value, str):
        digits = value[2:] if value[:2].lower() == "0o" else value
        if digits and len(digits) <= 4 and all(c in "01234567" for c in digits):
            return int(digits, 8)
        raise _Invalid("daemon.socket_mode", f"{value!r} is not an octal mode such as \"0660\"")
    if isinstance(value, int) and not isinstance(value, bool) and value > 0o777:
        # Almost always `660` written as a decimal TOML integer.
        raise _Invalid(
            "daemon.socket_mode",
            f"{value} is more than 0o777; write the mode as a string (\"0660\") or TOML octal (0o660)",
        )
    return value


def _table(parent: Mapping[str, Any], name: str, key: str) -> dict[str, Any]:
    value = parent.get(name, {})
    if not isinstance(value, dict):
        raise _Invalid(key, f"must be a table, not {_toml_type(value)}")
    return value


def _convert(table: Any, cls: type[msgspec.Struct], key: str) -> Any:
    """msgspec.convert with its error rewritten as `key.path: reason`."""
    try:
        return msgspec.convert(table, cls)
    except msgspec.ValidationError as e:
        cause = e.__cause__
        if isinstance(cause, _Invalid):  # raised by the Struct's __post_init__
            raise _Invalid(f"{key}.{cause.key}", cause.reason) from None
        message, _, path = str(e).partition(" - at `$")
        path = path.rstrip("`")
        unknown = _UNKNOWN_FIELD.match(message)
        if unknown:
            field = unknown.group(1)
            fields = msgspec.structs.fields(cls)
            raise _Invalid(
                f"{key}{path}.{field}", _unknown_reason(field, [f.name for f in fields])
            ) from None
        missing = _MISSING_FIELD.match(message)
        if missing:
            raise _Invalid(f"{key}{path}.{missing.group(1)}", "required key is missing") from None
        if message.startswith("Expected `object`"):
            message = f"must be a table ({message})"
        raise _Invalid(f"{key}{path}", message) from None


def _unknown_reason(key: str, known: Any) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown key {key!r}{hint}"


def _toml_type(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", int: "an integer", float: "a float"}.get(
        type(value), type(value).__name__
    )


# --- reload ---------------------------------------------------------------------------------


class ConfigDiff(msgspec.Struct, kw_only=True, frozen=True):
    """What changed between two configs, split by whether a running daemon can apply it.

    Keys are dotted paths: ``daemon.log_level``, ``profiles.clicks.linger_ms``, ``topics``.
    """

    live: tuple[str, ...] = ()
    restart: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        """Whether anything differs."""
        return bool(self.live or self.restart)

    @property
    def needs_restart(self) -> bool:
        """Whether some change takes effect only after a restart."""
        return bool(self.restart)


# [daemon] keys a running daemon re-reads (log level, shutdown deadline, the allow-lists that
# are checked at each accept). The rest shape processes, sockets or shared memory.
_LIVE_DAEMON_KEYS = frozenset(
    {"log_level", "shutdown_timeout_ms", "allowed_uids", "allowed_gids", "unknown_topic_cache_ms"}
)
# A profile switching idempotence on needs a producer id that only a worker start obtains.
_RESTART_PROFILE_KEYS = frozenset({"enable_idempotence"})


def diff_live(old: Config, new: Config) -> ConfigDiff:
    """Compare two configs for a SIGHUP reload.

    Live: profiles (added, removed, any key but ``enable_idempotence``), topic rules, and
    ``daemon.log_level``, ``shutdown_timeout_ms``, ``allowed_uids``, ``allowed_gids``,
    ``unknown_topic_cache_ms``.
    Everything else (socket, workers, runtime_dir, rings, metrics, the whole ``[kafka]``
    section) needs a restart.
    """
    live: list[str] = []
    restart: list[str] = []
    for f in msgspec.structs.fields(DaemonSettings):
        if getattr(old.daemon, f.name) != getattr(new.daemon, f.name):
            (live if f.name in _LIVE_DAEMON_KEYS else restart).append(f"daemon.{f.name}")
    for f in msgspec.structs.fields(KafkaSettings):
        if getattr(old.kafka, f.name) != getattr(new.kafka, f.name):
            restart.append(f"kafka.{f.name}")
    for name in sorted(old.profiles.keys() | new.profiles.keys()):
        before, after = old.profiles.get(name), new.profiles.get(name)
        if before is None or after is None:
            live.append(f"profiles.{name}")
            continue
        for f in msgspec.structs.fields(Profile):
            if getattr(before, f.name) != getattr(after, f.name):
                key = f"profiles.{name}.{f.name}"
                (restart if f.name in _RESTART_PROFILE_KEYS else live).append(key)
    if old.topics != new.topics:
        live.append("topics")
    return ConfigDiff(live=tuple(live), restart=tuple(restart))
