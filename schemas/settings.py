"""Process configuration, read once from ``HOOKGATE_*`` environment variables."""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from schemas.beat import validate_beat_schedule
from schemas.reports import validate_recipients
from schemas.retries import DEFAULT_RETRY_SCHEDULE, validate_retry_schedule


class Settings(BaseSettings):
    """Everything a hookgate process needs to know at start; frozen once read."""

    model_config = SettingsConfigDict(env_prefix="HOOKGATE_", frozen=True, extra="ignore")

    broker_url: str = "amqp://guest:guest@localhost:5672//"
    database_url: str = Field(default_factory=lambda: f"sqlite:///{Path.cwd() / 'hookgate.db'}")
    # Celery's result backend; empty means the store's database (Celery's SQLAlchemy backend).
    result_backend: str = ""
    allow_private_targets: bool = False
    # Networks webhook targets may resolve into even though they are not public (comma-separated CIDRs).
    allowed_target_cidrs: Annotated[tuple[IPv4Network | IPv6Network, ...], NoDecode] = ()

    # Ingest.
    max_body_bytes: int = 256 * 1024
    publish_timeout_s: float = 5.0
    publish_max_batch: int = 512
    broker_retry_after_s: int = 5
    api_key_cache_ttl_s: float = 10.0

    # Router.
    router_prefetch: int = 512
    router_batch_size: int = 256
    router_batch_wait_s: float = 0.005
    subscription_cache_ttl_s: float = 1.0

    # Webhook delivery.
    webhook_timeout_s: float = 10.0
    # Deliveries the router puts in one task, and parallel sends per worker process.
    webhook_batch_size: int = 64
    webhook_concurrency: int = 64
    # Delays before each attempt in seconds, comma-separated in the environment (HOOKGATE_RETRY_SCHEDULE).
    retry_schedule: Annotated[tuple[float, ...], NoDecode] = DEFAULT_RETRY_SCHEDULE
    # The longest wait a receiver's Retry-After may impose.
    retry_after_max_s: float = 36000.0
    # Endpoint health: the breaker opens when more than failure_ratio of at least min_attempts attempts
    # in a window failed, probes at growing intervals, and an endpoint failing for disable_after_s is
    # disabled (5 days).
    breaker_window_s: float = 60.0
    breaker_min_attempts: int = Field(default=10, ge=1)
    breaker_failure_ratio: float = Field(default=0.5, ge=0.0, lt=1.0)
    breaker_probe_interval_s: float = Field(default=30.0, gt=0)
    breaker_probe_interval_max_s: float = Field(default=600.0, gt=0)
    endpoint_disable_after_s: float = Field(default=5 * 24 * 3600.0, gt=0)
    # Deliveries being sent to one subscription at once, across all workers, unless it sets its own.
    endpoint_max_in_flight: int = Field(default=64, ge=1)
    # How long a rotated-out signing secret keeps signing beside the new one.
    secret_rotation_grace_s: float = Field(default=86400.0, ge=0)
    task_soft_time_limit_s: int = 60
    task_time_limit_s: int = 90
    # A claimed delivery's lease outlives the task's hard time limit by this much, so no second worker
    # sends while a killed child may still be sending.
    lease_margin_s: int = Field(default=30, ge=1)

    # Email delivery: the primary SMTP server, and an optional fallback (no host: none) that sends when
    # the primary is unreachable or answers with a transient error.
    smtp_host: str = "localhost"
    smtp_port: int = Field(default=25, ge=1, le=65535)
    smtp_username: str = ""
    smtp_password: str = Field(default="", repr=False)
    smtp_security: Literal["none", "starttls", "tls"] = "none"
    smtp_timeout_s: float = Field(default=30.0, gt=0)
    smtp_fallback_host: str = ""
    smtp_fallback_port: int = Field(default=25, ge=1, le=65535)
    smtp_fallback_username: str = ""
    smtp_fallback_password: str = Field(default="", repr=False)
    smtp_fallback_security: Literal["none", "starttls", "tls"] = "none"
    smtp_fallback_timeout_s: float = Field(default=30.0, gt=0)

    # Custom task routes: modules of the user's Celery tasks, added to the Celery app's include
    # (comma-separated in the environment).
    task_modules: Annotated[tuple[str, ...], NoDecode] = ()

    # Scheduled work (beat). Each schedule is a crontab line ("0 2 * * *", UTC), a number of seconds
    # between runs ("60"), or empty to turn the entry off.
    sweep_schedule: str = "60"
    cleanup_schedule: str = "0 2 * * *"
    report_schedule: str = "0 9 * * 1"
    # An open delivery untouched this long (and due this long) is taken for stranded and enqueued again.
    sweep_stuck_after_s: float = Field(default=300.0, gt=0)
    sweep_batch_size: int = Field(default=1000, ge=1)
    retention_days: float = Field(default=30.0, gt=0)
    # Events (with their deliveries and attempts) cleanup removes per transaction.
    cleanup_batch_size: int = Field(default=500, ge=1)
    report_recipients: Annotated[tuple[str, ...], NoDecode] = ()
    report_from: str = "hookgate@localhost"
    # How often a beat waiting for the lock tries again, and how often the holder checks it still has it.
    beat_lock_poll_s: float = Field(default=5.0, gt=0)

    # Heavy jobs (file imports, reports) on the heavy queue. The soft limit makes a job checkpoint and
    # continue in a follow-up task; the hard limit kills the pool child. The broker closes the channel of
    # a consumer holding a message unacked longer than its consumer_timeout (RabbitMQ's default 30 min),
    # so the hard limit must stay below it: a process refuses to start otherwise.
    heavy_soft_time_limit_s: int = Field(default=540, ge=1)
    heavy_time_limit_s: int = Field(default=600, ge=1)
    broker_consumer_timeout_s: float = Field(default=1800.0, gt=0)
    # How often a killed heavy task (worker lost) is run again before its job fails.
    heavy_max_worker_lost_retries: int = Field(default=3, ge=0)
    # Where uploaded and downloaded files, error reports and report results are kept; the gateway and
    # the heavy workers must see the same directory.
    files_dir: Path = Field(default_factory=lambda: Path.cwd() / "hookgate-files")
    max_file_bytes: int = Field(default=2 * 1024**3, ge=1)
    # Lines an import publishes per confirmed batch; its offset is checkpointed after each batch.
    import_batch_lines: int = Field(default=2000, ge=1, le=100_000)
    # How often (seconds) an import writes its checkpoint and PROGRESS state.
    import_checkpoint_interval_s: float = Field(default=1.0, gt=0)
    # An NDJSON import larger than this is split into chunks of about this size (on line ends), imported
    # in parallel by a Celery group; a chord's callback finishes the job.
    import_chunk_bytes: int = Field(default=256 * 1024**2, ge=1)
    # Timeout of a URL download's connect and of each read.
    download_timeout_s: float = Field(default=30.0, gt=0)
    # Management HTTP API of the broker (http://host:15672), for unacked counts in GET /v1/queues;
    # empty: ready messages and consumers only, over AMQP.
    broker_management_url: str = ""

    # HTTP server.
    host: str = "127.0.0.1"
    port: int = 8080
    http_workers: int = 1
    # Slow clients (slow-loris): a request's line and headers, then its body, must each arrive in time
    # or the gateway answers 408 and closes the connection.
    http_header_timeout_s: float = 10.0
    http_body_timeout_s: float = 30.0

    # Metrics: ports of the router's and each worker's metrics server (0 = none), and whether the
    # gateway's /metrics answers without an admin key.
    router_metrics_port: int = 0
    worker_metrics_port: int = 0
    metrics_public: bool = False

    # Processes and logs.
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # "auto": JSON lines unless stderr is a terminal.
    log_format: Literal["auto", "json", "console"] = "auto"
    # Where processes keep local state (Celery beat's schedule file).
    state_dir: Path = Field(default_factory=Path.cwd)
    # How long `hookgate up` waits for its children to stop before killing them.
    shutdown_timeout_s: float = 30.0

    @field_validator("retry_schedule", "allowed_target_cidrs", "report_recipients", "task_modules", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        # "0,5,300" as documented; a JSON list as well, which is how settings are handed to child processes.
        if isinstance(value, str):
            parts = value.strip().strip("[]").split(",")
            return tuple(part.strip().strip('"') for part in parts if part.strip())
        return value

    @field_validator("retry_schedule")
    @classmethod
    def _schedule(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        return validate_retry_schedule(value)

    @field_validator("sweep_schedule", "cleanup_schedule", "report_schedule")
    @classmethod
    def _beat_schedule(cls, value: str) -> str:
        return validate_beat_schedule(value)

    @field_validator("report_recipients")
    @classmethod
    def _recipients(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return validate_recipients(value)

    @model_validator(mode="after")
    def _heavy_limits(self) -> Settings:
        if self.heavy_soft_time_limit_s >= self.heavy_time_limit_s:
            raise ValueError("heavy_soft_time_limit_s must be below heavy_time_limit_s")
        if self.heavy_time_limit_s >= self.broker_consumer_timeout_s:
            raise ValueError(
                "heavy_time_limit_s must be below broker_consumer_timeout_s (the broker's consumer_timeout): "
                "the broker would close the channel of a heavy task still running"
            )
        return self

    @property
    def celery_result_backend(self) -> str:
        return self.result_backend or f"db+{self.database_url}"
