"""Backup policies: schedule, retention, parallelism and immutability settings.

A policy is a TOML file (``policies/default.toml`` documents every key). It is loaded into
a frozen :class:`Policy`; every backup records the policy it was taken under and the expiry
that policy gave it, so later policy edits never silently shorten what was promised.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timedelta
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from backup_tool.core.cron import parse_cron
from backup_tool.core.kinds import BackupKind
from backup_tool.errors import ConfigError

LOCK_MODES = ("none", "governance", "compliance")


# ----------------------------------------------------------------------------- the [health] vocabulary

CHECK_NAMES = ("schema", "rls", "foreign_keys", "index_performance", "function_execution")
TITLES = {"schema": "Schema validation", "rls": "RLS policy verification", "foreign_keys": "Foreign key integrity",
          "index_performance": "Index performance", "function_execution": "Function execution"}
FREQUENCY_WORDS = {"hourly": "0 * * * *", "daily": "0 9 * * *", "weekly": "0 9 * * sat", "monthly": "0 9 1 * *"}


def frequency_cron(value: str) -> str | None:
    """The cron expression a ``[health]`` frequency means (None: never). ``daily`` is 09:00,
    ``weekly`` Saturday 09:00 (the seed table's next-check times), ``hourly`` on the hour,
    ``monthly`` the 1st at 09:00, in ``schedule.timezone``; ValueError for anything else that
    is not a cron expression."""
    text = value.strip().lower()
    if text in ("", "off", "never"):
        return None
    if text in FREQUENCY_WORDS:
        return FREQUENCY_WORDS[text]
    parse_cron(value)
    return value


def frequency_label(value: str) -> str:
    text = value.strip().lower()
    if text in FREQUENCY_WORDS:
        return text.capitalize()
    return "never" if frequency_cron(value) is None else f"cron `{value}`"


@dataclass(frozen=True)
class Schedule:
    timezone: str = "UTC"
    full: str = "0 2 * * *"
    incremental: str = "0 */6 * * *"
    base: str = ""
    grace_minutes: int = 60
    run_due: str = "*/5 * * * *"
    maintenance: str = "30 5 * * *"


@dataclass(frozen=True)
class Retention:
    full_days: int = 30
    incremental_days: int = 7
    pitr_days: int = 7
    min_fulls: int = 1
    max_chain_length: int = 8
    run_after_backup: bool = True
    garbage_grace_hours: int = 24


CHANGE_DETECTION = ("auto", "wal", "checksum")


@dataclass(frozen=True)
class BackupSettings:
    jobs: int = 2
    compression_level: int = 3
    """zstd level of base backups and WAL (and of logical backups when ``logical_compression_level``
    is not set, see :func:`parse_policy`)."""
    logical_compression_level: int = 1
    """zstd level of logical backups. COPY text is compressed at level 1 for about half the CPU
    of level 3 (measured on the bench's database: 1.0 s against 2.0 s, 126 MB stored against
    136 MB, both below ``pg_dump -Fc``'s 160 MB); the CPU decides a logical backup's time on
    a machine whose cores the COPY and the compression share."""
    fast_checkpoint: bool = True
    encryption_key_id: str = ""
    change_detection: str = "auto"
    split_table_mb: int = 256


@dataclass(frozen=True)
class ObjectLock:
    mode: str = "none"


@dataclass(frozen=True)
class ValidationSettings:
    after_restore: bool = True


@dataclass(frozen=True)
class AuditSettings:
    window_days: int = 30


@dataclass(frozen=True)
class MonitoringSettings:
    verify_max_age_hours: int = 48
    wal_max_age_minutes: int = 60


@dataclass(frozen=True)
class SchemaSettings:
    """``[schema] migrations``: the migrations folder whose replay the audit compares with the newest
    backup (a path relative to the policy file, or absolute); empty: no schema-drift check."""

    migrations: str = ""


@dataclass(frozen=True)
class HealthSettings:
    """``[health]``: when run-due runs each health check (a cron expression, or ``daily`` /
    ``weekly`` / ``hourly``; ``""`` = never) and what the checks look at
    (:mod:`backup_tool.jobs.health`)."""

    schema: str = "daily"
    rls: str = "weekly"
    foreign_keys: str = "daily"
    index_performance: str = "weekly"
    function_execution: str = "daily"
    exposed_schemas: tuple[str, ...] = ("public",)
    smoke_calls: tuple[str, ...] = ()
    smoke_timeout_seconds: int = 30
    fk_sample_rows: int = 100000
    report_min_bytes: int = 1048576
    bloat_ratio: float = 0.5
    seq_scan_min_bytes: int = 104857600


@dataclass(frozen=True)
class Policy:
    name: str = "default"
    description: str = ""
    source: str = "built-in"
    schedule: Schedule = field(default_factory=Schedule)
    retention: Retention = field(default_factory=Retention)
    backup: BackupSettings = field(default_factory=BackupSettings)
    object_lock: ObjectLock = field(default_factory=ObjectLock)
    validation: ValidationSettings = field(default_factory=ValidationSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    monitoring: MonitoringSettings = field(default_factory=MonitoringSettings)
    schema: SchemaSettings = field(default_factory=SchemaSettings)
    health: HealthSettings = field(default_factory=HealthSettings)

    def retention_days(self, kind: str) -> int:
        """Days a backup of ``kind`` is kept (0 for a kind the policy does not know)."""
        days: dict[str, int] = {
            BackupKind.FULL: self.retention.full_days,
            BackupKind.INCREMENTAL: self.retention.incremental_days,
            BackupKind.BASE: self.retention.pitr_days,
        }
        return days.get(kind, 0)

    def retention_for(self, kind: str) -> timedelta:
        return timedelta(days=self.retention_days(kind))

    def expires_at(self, kind: str, taken_at: datetime) -> datetime:
        return taken_at + self.retention_for(kind)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SECTIONS: dict[str, type] = {
    "schedule": Schedule,
    "retention": Retention,
    "backup": BackupSettings,
    "object_lock": ObjectLock,
    "validation": ValidationSettings,
    "audit": AuditSettings,
    "monitoring": MonitoringSettings,
    "schema": SchemaSettings,
    "health": HealthSettings,
}


def _check_cron(path: str, key: str, expr: str, optional: bool = False) -> None:

    if optional and expr == "":
        return
    try:
        parse_cron(expr)
    except ValueError as exc:
        raise ConfigError(f"{path}: [schedule] {key} = {expr!r} is not a cron expression ({exc})",
                          "use five fields: minute hour day-of-month month day-of-week, e.g. '0 2 * * *'"
                          + (", or \"\" to disable" if optional else "")) from None


def _check_timezone(path: str, name: str) -> None:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"{path}: schedule.timezone = {name!r} is not a known time zone",
                          "use an IANA name such as 'UTC' or 'Europe/Paris'") from None


def _build(cls: type, section: str, raw: Any, path: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: [{section}] must be a table")
    allowed = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in allowed:
            raise ConfigError(f"{path}: unknown key {section}.{key}",
                              f"allowed keys: {', '.join(sorted(allowed))}")
        default = allowed[key].default
        if isinstance(default, tuple) and isinstance(value, list) and all(isinstance(v, str) for v in value):
            value = tuple(value)
        elif isinstance(default, float) and type(value) is int:
            value = float(value)
        if type(value) is not type(default):
            raise ConfigError(f"{path}: {section}.{key} = {value!r} has the wrong type",
                              f"expected {type(default).__name__}, e.g. {default!r}")
        values[key] = value
    return cls(**values)


def _validate(policy: Policy, path: str) -> None:
    r, b = policy.retention, policy.backup
    for key in ("full_days", "incremental_days", "pitr_days"):
        if getattr(r, key) < 1:
            raise ConfigError(f"{path}: retention.{key} must be at least 1 (days)")
    if r.min_fulls < 1:
        raise ConfigError(f"{path}: retention.min_fulls must be at least 1")
    if r.max_chain_length < 1:
        raise ConfigError(f"{path}: retention.max_chain_length must be at least 1")
    if not 1 <= b.jobs <= 64:
        raise ConfigError(f"{path}: backup.jobs must be between 1 and 64")
    for key in ("compression_level", "logical_compression_level"):
        if not 1 <= getattr(b, key) <= 19:
            raise ConfigError(f"{path}: backup.{key} must be between 1 and 19")
    if not 0 <= b.split_table_mb <= 1048576:
        raise ConfigError(f"{path}: backup.split_table_mb must be between 0 (never split) and 1048576")
    if b.change_detection not in CHANGE_DETECTION:
        raise ConfigError(f"{path}: backup.change_detection = {b.change_detection!r} is not allowed",
                          f"allowed: {', '.join(CHANGE_DETECTION)}")
    if b.encryption_key_id and not re.fullmatch(r"[0-9a-f]{16}", b.encryption_key_id):
        raise ConfigError(f"{path}: backup.encryption_key_id = {b.encryption_key_id!r} is not a key id",
                          "use the 16 hex digits 'backup-tool check' or 'list --json' show for the key")
    if policy.object_lock.mode not in LOCK_MODES:
        raise ConfigError(f"{path}: object_lock.mode = {policy.object_lock.mode!r} is not allowed",
                          f"allowed: {', '.join(LOCK_MODES)}")
    s, a, mon = policy.schedule, policy.audit, policy.monitoring
    _check_timezone(path, s.timezone)
    _check_cron(path, "full", s.full)
    _check_cron(path, "incremental", s.incremental, optional=True)
    _check_cron(path, "base", s.base, optional=True)
    _check_cron(path, "run_due", s.run_due)
    _check_cron(path, "maintenance", s.maintenance, optional=True)
    if not 0 <= s.grace_minutes <= 24 * 60:
        raise ConfigError(f"{path}: schedule.grace_minutes must be between 0 and 1440")
    if r.garbage_grace_hours < 1:
        raise ConfigError(f"{path}: retention.garbage_grace_hours must be at least 1 (hours)",
                          "a younger object may belong to a backup still in progress")
    if a.window_days < 1:
        raise ConfigError(f"{path}: audit.window_days must be at least 1 (days)")
    if mon.verify_max_age_hours < 0 or mon.wal_max_age_minutes < 0:
        raise ConfigError(f"{path}: monitoring thresholds must be 0 (off) or positive")
    _validate_health(policy.health, path)


def _validate_health(h: HealthSettings, path: str) -> None:

    for name in CHECK_NAMES:
        value = getattr(h, name)
        try:
            frequency_cron(value)
        except ValueError as exc:
            raise ConfigError(f"{path}: health.{name} = {value!r} is not a frequency ({exc})",
                              "use daily, weekly, hourly, a cron expression such as '0 9 * * *', or \"\" for never") from None
    for key in ("smoke_timeout_seconds", "fk_sample_rows"):
        if getattr(h, key) < 1:
            raise ConfigError(f"{path}: health.{key} must be at least 1")
    if h.report_min_bytes < 0 or h.seq_scan_min_bytes < 0 or not 0 < h.bloat_ratio < 1:
        raise ConfigError(f"{path}: health thresholds: byte sizes must be 0 or positive, bloat_ratio between 0 and 1")
    if not h.exposed_schemas:
        raise ConfigError(f"{path}: health.exposed_schemas must name at least one schema", "e.g. [\"public\"]")


def parse_policy(text: str, path: str) -> Policy:
    """The policy a file describes. A ``[backup]`` table that sets ``compression_level`` but not
    ``logical_compression_level`` keeps its level for logical backups too, as before the two
    were told apart."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})", "fix the file's syntax") from None
    top: dict[str, Any] = {"source": path}
    for key, value in raw.items():
        if key in SECTIONS:
            top[key] = _build(SECTIONS[key], key, value, path)
            if key == "backup" and "compression_level" in value and "logical_compression_level" not in value:
                top[key] = replace(top[key], logical_compression_level=top[key].compression_level)
        elif key in ("name", "description"):
            if not isinstance(value, str):
                raise ConfigError(f"{path}: {key} must be a string")
            top[key] = value
        else:
            raise ConfigError(f"{path}: unknown key {key!r}",
                              f"allowed: name, description, {', '.join(SECTIONS)}")
    top.setdefault("name", Path(path).stem)
    policy = Policy(**top)
    _validate(policy, path)
    return policy


def bundled_policies() -> Traversable:
    """The shipped policies: ``backup_tool/policies/`` inside an installed wheel (setuptools maps
    the top-level ``policies/`` folder there), else the source checkout's ``policies/``."""
    installed = files("backup_tool") / "policies"
    if installed.is_dir():
        return installed
    return Path(__file__).resolve().parent.parent / "policies"


def policy_dirs() -> list[Traversable]:
    """Where ``--policy NAME`` is looked up, first match wins: ``BACKUP_TOOL_POLICY_DIR``,
    ``./policies``, then the bundled policies."""
    dirs: list[Traversable] = []
    if env := os.environ.get("BACKUP_TOOL_POLICY_DIR"):
        dirs.append(Path(env))
    dirs.append(Path.cwd() / "policies")
    dirs.append(bundled_policies())
    return dirs


def load_policy(name_or_path: str | None) -> Policy:
    """Load a policy by NAME (``policies/NAME.toml``) or PATH; ``default`` always resolves."""
    ref = name_or_path or "default"
    candidates: list[Traversable]
    if "/" in ref or ref.endswith(".toml"):
        candidates = [Path(ref)]
    else:
        candidates = [d / f"{ref}.toml" for d in policy_dirs()]
    for candidate in candidates:
        if candidate.is_file():
            try:
                text = candidate.read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError(f"cannot read policy file {candidate}: {exc.strerror}") from None
            return parse_policy(text, str(candidate))
    if ref == "default":
        return Policy()
    raise ConfigError(f"policy {ref!r} not found",
                      "pass a path to a .toml file or a name under policies/: "
                      + ", ".join(str(c) for c in candidates))
