"""One typed, validated, frozen configuration model.

The same model is built from a TOML file (``albatross serve --config FILE``), from
code (``Config(...)``) or from nothing (:func:`embedded_default`). Validation happens
once, at start; afterwards every object is frozen. A bad file is reported as
:class:`ConfigError` naming the key, the value and the rule, which the CLI turns into
exit code 2.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class GatewayConfig(_Frozen):
    """The client-facing HTTP server."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8000
    max_body_bytes: Annotated[int, Field(ge=1024, le=64 * 1024 * 1024)] = 1024 * 1024
    """Largest request body accepted; larger ones get 413."""
    max_tokens_default: Annotated[int, Field(ge=1)] = 256
    """``max_tokens`` used when a request does not say."""
    max_tokens_limit: Annotated[int, Field(ge=1)] = 8192
    """Largest ``max_tokens`` a request may ask for."""
    first_token_timeout_s: Annotated[float, Field(gt=0)] = 120.0
    """How long a request may wait for its first token before it fails with 504."""


class SupervisorConfig(_Frozen):
    """How engine processes are started, watched and stopped."""

    log_dir: Path = Path(".albatross/logs")
    """One append-mode log file per replica goes here."""
    ready_timeout_s: Annotated[float, Field(gt=0)] = 120.0
    """A replica that does not answer its health endpoint within this time is restarted."""
    health_interval_s: Annotated[float, Field(gt=0)] = 1.0
    """Period of health checks on ready replicas."""
    health_timeout_s: Annotated[float, Field(gt=0)] = 5.0
    """How long a health check of a ready replica may take: an engine busy with many
    streams answers slowly, and restarting it for that would move all of them."""
    health_failures: Annotated[int, Field(ge=1)] = 3
    """Consecutive failed checks after which a replica is restarted (managed) or leaves
    the pool until it passes again (external endpoints)."""
    restart_backoff_initial_s: Annotated[float, Field(gt=0)] = 0.5
    restart_backoff_max_s: Annotated[float, Field(gt=0)] = 30.0
    stop_grace_s: Annotated[float, Field(ge=0)] = 5.0
    """Time between SIGTERM and SIGKILL when stopping a replica."""

    @model_validator(mode="after")
    def _backoff_order(self) -> SupervisorConfig:
        if self.restart_backoff_max_s < self.restart_backoff_initial_s:
            raise ValueError("restart_backoff_max_s must be >= restart_backoff_initial_s")
        return self


class ContinuityConfig(_Frozen):
    """How streams survive their replica (see README: Stream continuity)."""

    max_migrations: Annotated[int, Field(ge=0, le=100)] = 8
    """Moves one request may make; after that a failure ends its stream with an error."""
    stall_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    """A replica that sends no token for this long is treated as failed."""
    journal_retention_s: Annotated[float, Field(ge=0)] = 300.0
    """How long a stream's journal is kept after its client left, for Last-Event-ID resume."""
    slot_dir: Path = Path(".albatross/slots")
    """Directory shared by managed replicas (``--slot-save-path``) for KV-cache moves."""
    move_path: Literal["auto", "kv", "prewarm", "reprefill"] = "auto"
    """Path of planned moves: auto = KV transfer where both replicas share ``slot_dir``, else pre-warm."""


class SpotConfig(_Frozen):
    """Preemption notices and what follows them (see README: Running on spot instances)."""

    source: Literal["none", "local", "aws", "gcp", "azure"] = "local"
    """Where notices come from. ``local``: the control API, ``albatross preempt`` and
    SIGUSR1 only; a cloud: its metadata service too."""
    base_url: str | None = None
    """Metadata service base URL; unset = the cloud's own."""
    poll_interval_s: Annotated[float, Field(gt=0)] = 5.0
    vm_name: str | None = None
    """Azure: this VM's name; events for other VMs of its availability set are ignored.
    Unset = act on every ``Preempt`` event."""
    default_lead_s: Annotated[float, Field(gt=0)] = 30.0
    """Deadline assumed when a notice gives none (GCP, local triggers)."""
    margin_s: Annotated[float, Field(ge=0)] = 5.0
    """Kept free before the deadline when deciding to finish a stream in place."""
    replace: bool = True
    """Once a drained managed replica is empty (or its deadline passed), restart it on
    this machine: the local provider's replacement. For ``albatross agent``: restart the
    host's engines once drained (for tests and notices that do not take the host)."""
    aws: AwsReplacementConfig | None = None
    """Launch a replacement EC2 host at once when an agent host gets a notice."""


class AwsReplacementConfig(_Frozen):
    """Replacement hosts on EC2 for preempted ``albatross agent`` hosts (see README:
    Running on spot instances). Launched hosts must run ``albatross agent`` at boot (in
    the launch template's user data) so that their engines register with this gateway."""

    region: Annotated[str, Field(min_length=1)]
    launch_template: str | None = None
    """A launch template name, or an id starting with ``lt-``."""
    image_id: str | None = None
    """An AMI id; then ``instance_types`` must not be empty."""
    instance_types: tuple[str, ...] = ()
    """Tried in order for spot capacity; empty = the launch template's type."""
    subnet_id: str | None = None
    tags: dict[str, str] = {}
    fallback_on_demand: bool = True
    """Launch on-demand when every instance type is refused spot capacity."""
    endpoint_url: str | None = None
    """EC2 API endpoint; unset = AWS's own (set for an EC2-compatible API)."""

    @model_validator(mode="after")
    def _one_source(self) -> AwsReplacementConfig:
        if (self.launch_template is None) == (self.image_id is None):
            raise ValueError("give exactly one of launch_template and image_id")
        if self.image_id is not None and not self.instance_types:
            raise ValueError("instance_types must not be empty when launching from image_id")
        return self


class AgentConfig(_Frozen):
    """``albatross agent``: runs this config's models on an engine host apart from the
    gateway, registers them with the gateway and reports preemption notices to it."""

    gateway_url: str | None = None
    """The gateway's base URL (its control API); ``--gateway`` overrides it."""
    host_id: str | None = None
    """This host's name in replica ids (``model@HOST/0``); unset = the hostname."""
    advertise_host: str = "127.0.0.1"
    """The address the gateway reaches this host's engines on."""
    bind_host: str = "127.0.0.1"
    """The address engines listen on (``0.0.0.0`` for all interfaces)."""
    heartbeat_s: Annotated[float, Field(gt=0)] = 5.0
    """Period of re-registration: a gateway restarted meanwhile learns the replicas again."""
    drain_poll_s: Annotated[float, Field(gt=0)] = 0.5
    """Period of the drain-progress check after a notice."""
    drain_on_stop_s: Annotated[float, Field(ge=0)] = 30.0
    """On SIGINT/SIGTERM: how long streams may take to leave this host's replicas (the
    gateway moves them) before the engines are stopped."""

    @field_validator("gateway_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None and not (v.startswith("http://") and len(v) > len("http://")):
            raise ValueError(f"{v!r} must be an http:// base URL")
        return None if v is None else v.rstrip("/")


class ControlConfig(_Frozen):
    """The authenticated control API under ``/admin``."""

    token: str | None = None
    """Bearer token; unset = ``$ALBATROSS_CONTROL_TOKEN``; neither = control API disabled (403)."""

    @field_validator("token")
    @classmethod
    def _long_enough(cls, v: str | None) -> str | None:
        if v is not None and len(v) < 16:
            raise ValueError("must be at least 16 characters")
        return v


class LlamaServerConfig(_Frozen):
    """Where the llama-server binary comes from."""

    binary: Path | None = None
    """Use this binary; unset = build (once, cached) from the pinned llama.cpp sources."""
    cache_dir: Path | None = None
    """Build cache; unset = ``$ALBATROSS_CACHE`` or ``~/.cache/albatross``."""


class ModelConfig(_Frozen):
    """One model served under one name, by managed replicas or existing endpoints."""

    name: Annotated[str, Field(min_length=1, max_length=256)]
    """The name clients put in ``model``."""
    engine: Literal["llama-server"] = "llama-server"
    path: Path | None = None
    """GGUF file for managed replicas; unset = the embedded SmolLM2-135M-Instruct."""
    replicas: Annotated[int, Field(ge=0, le=64)] = 2
    """Managed replicas to start: 0 when only ``endpoints`` or replicas registered by
    ``albatross agent`` hosts serve the model."""
    endpoints: tuple[str, ...] = ()
    """Base URLs of engines already running elsewhere (not started or stopped by us)."""
    threads: Annotated[int, Field(ge=1, le=256)] = 1
    ctx_size: Annotated[int, Field(ge=128)] = 4096
    parallel: Annotated[int, Field(ge=1, le=256)] = 4
    """Concurrent sequences per replica (llama-server ``-np``)."""
    instance_type: str = "local"
    """For the cost ledger: what each replica runs on."""
    price_spot_per_hour: Annotated[float, Field(ge=0)] = 0.0
    price_on_demand_per_hour: Annotated[float, Field(ge=0)] = 0.0
    """Prices per replica-hour for the cost ledger (``GET /admin/cost``, ``albatross cost``)."""
    numerics: Literal["fast", "exact"] = "fast"
    """``exact``: managed replicas run with ``-ub 1 -fa off -ctk f32 -ctv f32`` so a
    re-prefilled continuation is bit-identical to step-by-step decoding (at a cost in
    prefill speed and batching). ``fast``: llama-server's defaults; KV-cache moves stay
    exact, re-prefill may flip greedy near-ties (see README: Exactness)."""
    extra_args: tuple[str, ...] = ()
    """Further llama-server arguments, passed as they are (never through a shell)."""

    @field_validator("endpoints")
    @classmethod
    def _check_endpoints(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for url in v:
            if not (url.startswith("http://") and len(url) > len("http://")):
                raise ValueError(f"endpoint {url!r} must be an http:// base URL")
        return tuple(u.rstrip("/") for u in v)



class CheckpointConfig(_Frozen):
    """CRIU checkpoint/restore of engine processes (see README: Warm restarts with CRIU)."""

    enabled: bool = False
    """Restore a replica from its newest image instead of cold-starting it, when one exists."""
    criu: Path | None = None
    """criu executable; unset = the private CRIU 4.1.1 of ``python -m albatross.checkpoint.install``."""
    image_dir: Path = Path(".albatross/images")
    """Image store: one owner-only directory per replica and version."""
    disk_budget_bytes: Annotated[int, Field(ge=0)] | None = None
    """Most bytes all images together may use; unset = no limit."""
    on_budget_exceeded: Literal["refuse", "stop"] = "refuse"
    """An image that would not fit: ``refuse`` the checkpoint (the engine keeps running),
    or ``stop`` the engine without an image (it cold-starts next time)."""
    keep_after_restore: bool = False
    """Keep an image after restoring it (for further warm restarts), else delete it."""
    tcp_established: bool = True
    """Dump open TCP connections too (clients' keep-alive connections survive)."""
    s3_bucket: str | None = None
    """Also upload images here (and fetch them from here when missing locally)."""
    s3_prefix: str = "albatross/images"
    s3_endpoint_url: str | None = None
    """S3-compatible endpoint; unset = AWS."""


class Config(_Frozen):
    """The whole configuration."""

    checkpoint: CheckpointConfig = CheckpointConfig()
    gateway: GatewayConfig = GatewayConfig()
    supervisor: SupervisorConfig = SupervisorConfig()
    llama_server: LlamaServerConfig = LlamaServerConfig()
    continuity: ContinuityConfig = ContinuityConfig()
    control: ControlConfig = ControlConfig()
    spot: SpotConfig = SpotConfig()
    agent: AgentConfig = AgentConfig()
    models: Annotated[tuple[ModelConfig, ...], Field(min_length=1)] = (
        ModelConfig(name=DEFAULT_MODEL_NAME),
    )

    @field_validator("models")
    @classmethod
    def _unique_names(cls, v: tuple[ModelConfig, ...]) -> tuple[ModelConfig, ...]:
        seen: set[str] = set()
        for m in v:
            if m.name in seen:
                raise ValueError(f"model name {m.name!r} appears twice")
            seen.add(m.name)
        return v

    def model(self, name: str) -> ModelConfig | None:
        for m in self.models:
            if m.name == name:
                return m
        return None


class ConfigError(Exception):
    """Raised when a configuration file cannot be read or breaks a rule.

    ``problems`` holds one line per problem: the key, the value and the rule.
    """

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


def _describe(err: ValidationError) -> list[str]:
    lines = []
    errors = err.errors()
    locs = [tuple(e["loc"]) for e in errors]
    for e in errors:
        loc = tuple(e["loc"])
        if any(o != loc and o[: len(loc)] == loc for o in locs):
            continue  # a consequence of a more precise error below it
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        value: Any = e.get("input")
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        rule = e["msg"]
        if e["type"] == "extra_forbidden":
            rule = "unknown key"
        lines.append(f"{key} = {shown}: {rule}")
    return lines


def config_from_mapping(data: dict[str, Any], source: str = "<config>") -> Config:
    """Validate a parsed mapping into a frozen :class:`Config`."""
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, _describe(exc)) from exc


def load_config(path: Path | None) -> Config:
    """Load and validate ``path``; ``None`` gives the embedded default."""
    if path is None:
        return embedded_default()
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read file: {exc.strerror}"]) from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(str(path), [f"not valid TOML: {exc}"]) from exc
    return config_from_mapping(data, str(path))


def embedded_default() -> Config:
    """Gateway on 127.0.0.1:8000 over two llama-server replicas of SmolLM2-135M-Instruct."""
    return Config()
