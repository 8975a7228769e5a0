"""One typed, validated, frozen configuration model.

The same model is built from a TOML file (``albatross serve --config FILE``), from
code (``Config(...)``) or from nothing (:func:`embedded_default`). Validation happens
once, at start; afterwards every object is frozen. A bad file is reported as
:class:`ConfigError` naming the key, the value and the rule, which the CLI turns into
exit code 2.
"""

from __future__ import annotations

import os
import shutil
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

from albatross.core.eviction import (
    EngineKind,
    EvictionPolicy,
    EvictionPolicyError,
    HostTools,
    Process,
    Weights,
)
from albatross.core.eviction import validate as validate_eviction
from albatross.core.switch_policy import ModelSpec, Policy, SettingsError, SwitchSettings

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


class EvictionConfig(_Frozen):
    """How a model sleeps on a shared GPU: where its weights go, what its process does
    (see README: Several models on one GPU; ``core/eviction.py`` has the matrix)."""

    weights: Literal["retain", "offload", "discard"] = "discard"
    process: Literal["keep_running", "cuda_suspend", "checkpoint", "stop"] = "stop"


class SwitchConfig(_Frozen):
    """Several models taking turns on one GPU (see README: Several models on one GPU).

    Off while ``gpu_budget_gib`` is empty: every model then runs all the time, as
    configured by its ``replicas``."""

    gpu_budget_gib: dict[str, Annotated[float, Field(gt=0)]] = {}
    """GPU name -> memory the models resident on it may use together; models name their
    GPU in ``gpu``. Empty = switching off."""
    policy: Literal["fifo", "cost_aware"] = "fifo"
    """Whom to wake next: the oldest waiting request's model, or the most requests per
    second of switch cost (coalescing requests for ``coalesce_s``, at most ``max_wait_s``)."""
    queue_timeout_s: Annotated[float, Field(gt=0)] = 60.0
    """A request waits at most this long for its model to wake; then 504."""
    min_active_s: Annotated[float, Field(ge=0)] = 10.0
    """A woken model serves at least this long before it may be evicted (no thrashing)."""
    coalesce_s: Annotated[float, Field(ge=0)] = 2.0
    max_wait_s: Annotated[float, Field(gt=0)] = 30.0
    cost_alpha: Annotated[float, Field(gt=0, le=1)] = 0.3
    """Weight of the newest measurement in the switch-cost estimate."""
    max_wake_attempts: Annotated[int, Field(ge=1)] = 3
    """Failed wakes in a row after which waiting requests get 503 with Retry-After."""
    wake_backoff_initial_s: Annotated[float, Field(gt=0)] = 1.0
    wake_backoff_max_s: Annotated[float, Field(gt=0)] = 30.0
    cuda_checkpoint_command: str = "cuda-checkpoint"
    """NVIDIA's cuda-checkpoint (a name on PATH or a path), for ``process = "cuda_suspend"``."""
    criu_command: Path | None = None
    """criu for ``process = "checkpoint"``; unset = ``checkpoint.criu`` or the private install."""
    router_args: tuple[str, ...] = ()
    """More arguments for the shared llama-server router (models with ``weights =
    "discard"``, ``process = "keep_running"``), passed as they are (no shell)."""

    @property
    def active(self) -> bool:
        return bool(self.gpu_budget_gib)


class VllmConfig(_Frozen):
    """How vLLM engines are launched (models with ``engine = "vllm"``)."""

    python: Path | None = None
    """A python with vLLM installed; unset = the venv of ``python -m albatross.engines.vllm_install``."""
    dtype: str = "float32"
    """``--dtype``; float32 makes greedy tokens match llama-server's on CPU."""
    enforce_eager: bool = True
    """``--enforce-eager``: no graph capture (starts in about half the time)."""
    cpu_kvcache_space_gib: Annotated[int, Field(ge=1)] = 1
    """``VLLM_CPU_KVCACHE_SPACE`` on CPU hosts."""
    enable_sleep_mode: bool = False
    """``--enable-sleep-mode``: needed on GPU hosts for sleep to free memory; vLLM
    refuses it on CPU hosts, where sleep then answers and frees nothing."""


class ModelConfig(_Frozen):
    """One model served under one name, by managed replicas or existing endpoints."""

    name: Annotated[str, Field(min_length=1, max_length=256)]
    """The name clients put in ``model``."""
    engine: Literal["llama-server", "vllm"] = "llama-server"
    """The engine its replicas run: managed vLLM replicas are started with ``vllm.*``,
    ``parallel`` (``--max-num-seqs``) and ``ctx_size`` (``--max-model-len``); streams
    move to and from them by re-prefill (vLLM cannot save one sequence's KV cache)."""
    path: Path | None = None
    """GGUF file for managed replicas (a Hugging Face directory for vLLM); unset = the
    embedded SmolLM2-135M-Instruct."""
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
    eviction: EvictionConfig = EvictionConfig()
    """With switching on: how the model is put to sleep when another needs its GPU."""
    footprint_gib: Annotated[float, Field(gt=0)] = 1.0
    """GPU memory the model holds while awake (weights + KV cache + runtime)."""
    gpu: str = "0"
    """Which of ``switch.gpu_budget_gib`` it runs on."""
    pinned: bool = False
    """Never evicted (the control API can unpin it)."""
    wake_prior_s: Annotated[float, Field(ge=0)] = 10.0
    """Expected wake time until one has been measured (cost-aware policy)."""
    sleep_prior_s: Annotated[float, Field(ge=0)] = 2.0

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


class NetmoveConfig(_Frozen):
    """Moving live client connections to another gateway host (see README: Moving live
    connections between gateways). Off by default; needs root or CAP_NET_ADMIN +
    CAP_BPF, and the same settings (with their own ``gateway_id``) on every peer."""

    enabled: bool = False
    gateway_id: str | None = None
    """This gateway's name in handoffs (peers address it by this name); required."""
    interface: str = "eth0"
    """The interface clients reach the VIP through: the hold and the guard attach here."""
    vip: str | None = None
    """The service address clients connect to (it moves with the connections); required."""
    vip_prefixlen: Annotated[int, Field(ge=1, le=128)] | None = None
    """Prefix of the VIP on ``interface``; unset = a host prefix (/32 or /128)."""
    route_netns: str | None = None
    """A named network namespace (``/run/netns/NAME``) whose host route for the VIP is
    pointed at the gateway that holds it (a router on this machine); unset = none."""
    route_via: str | None = None
    """This gateway's address as that route's next hop (with ``route_netns``)."""
    listen_host: str = "0.0.0.0"
    listen_port: Annotated[int, Field(ge=0, le=65535)] = 7070
    """Where the handoff server listens for connections moved here."""
    peers: dict[str, str] = {}
    """Gateway id -> ``host:port`` of its handoff server; ``migrate-gateway --to`` names
    one (by id or host), a preemption notice for this host picks the first."""
    key_file: Path | None = None
    """File holding the shared handoff key (>= 16 bytes); unset = ``$ALBATROSS_HANDOFF_KEY``."""
    drain_timeout_s: Annotated[float, Field(gt=0, le=30)] = 1.0
    """How long to wait for clients to acknowledge what they were sent; then the
    unacknowledged bytes travel with the socket state."""
    on_preemption: bool = True
    """Move every connection to the first peer when this host gets a preemption notice."""

    @field_validator("peers")
    @classmethod
    def _peer_addresses(cls, v: dict[str, str]) -> dict[str, str]:
        for name, addr in v.items():
            host, sep, port = addr.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"peer {name!r}: {addr!r} must be host:port")
        return v

    @model_validator(mode="after")
    def _complete(self) -> NetmoveConfig:
        if self.enabled:
            missing = [k for k in ("gateway_id", "vip") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"{' and '.join(missing)} must be set when enabled")
            if (self.route_netns is None) != (self.route_via is None):
                raise ValueError("route_netns and route_via go together")
            if self.gateway_id in self.peers:
                raise ValueError(f"peers must not name this gateway ({self.gateway_id!r})")
        return self


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
    netmove: NetmoveConfig = NetmoveConfig()
    switch: SwitchConfig = SwitchConfig()
    vllm: VllmConfig = VllmConfig()
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

    @model_validator(mode="after")
    def _switching(self) -> Config:
        for i, m in enumerate(self.models):
            if self.switch.active and (m.replicas != 1 or m.endpoints):
                raise ValueError(
                    f"models.{i} ({m.name!r}): replicas = {m.replicas}, endpoints = "
                    f"{list(m.endpoints)}: with switching on a model runs exactly one managed "
                    "engine (replicas = 1, no endpoints)"
                )
            try:
                validate_eviction(
                    m.name, EngineKind(m.engine), _policy(m), host_tools(self, only=m)
                )
            except EvictionPolicyError as exc:
                hint = ""
                if m.eviction.process == "cuda_suspend":
                    hint = f" (switch.cuda_checkpoint_command = {self.switch.cuda_checkpoint_command!r} was not found)"
                raise ValueError(f"models.{i}.eviction: {exc}{hint}") from None
        if self.switch.active:
            try:
                switch_settings(self)
            except SettingsError as exc:
                raise ValueError(f"switch: {exc}") from None
        return self

    def model(self, name: str) -> ModelConfig | None:
        for m in self.models:
            if m.name == name:
                return m
        return None


def _policy(m: ModelConfig) -> EvictionPolicy:
    return EvictionPolicy(Weights(m.eviction.weights), Process(m.eviction.process))


def host_tools(config: Config, only: ModelConfig | None = None) -> HostTools:
    """Which tools the eviction policies need are on this host (looked up only for the
    models, or the one model, whose policy needs them)."""
    models = (only,) if only is not None else config.models
    processes = {m.eviction.process for m in models}
    cuda = False
    if "cuda_suspend" in processes:
        cuda = shutil.which(config.switch.cuda_checkpoint_command) is not None
    criu = False
    if "checkpoint" in processes:
        criu = criu_command(config) is not None
    return HostTools(cuda_checkpoint=cuda, criu=criu)


def criu_command(config: Config) -> Path | None:
    """The criu the switch uses: ``switch.criu_command``, ``checkpoint.criu``, else the
    private install (None when none is there)."""
    for p in (config.switch.criu_command, config.checkpoint.criu):
        if p is not None:
            return p if os.access(p, os.X_OK) else None
    # Lazy: checkpoint.install imports modules that import this one.
    from albatross.checkpoint.install import installed_criu

    return installed_criu()


def switch_settings(config: Config, tools: HostTools | None = None) -> SwitchSettings:
    """The scheduler's settings for ``config`` (switching on). Raises the core's
    :class:`SettingsError` or :class:`EvictionPolicyError` naming key, value and rule."""
    sw = config.switch
    specs = tuple(
        ModelSpec(
            name=m.name,
            engine=EngineKind(m.engine),
            eviction=_policy(m),
            footprint_gib=m.footprint_gib,
            gpu=m.gpu,
            pinned=m.pinned,
            wake_prior_s=m.wake_prior_s,
            sleep_prior_s=m.sleep_prior_s,
        )
        for m in config.models
    )
    return SwitchSettings(
        models=specs,
        gpu_budget_gib=sw.gpu_budget_gib,
        policy=Policy(sw.policy),
        queue_timeout_s=sw.queue_timeout_s,
        min_active_s=sw.min_active_s,
        coalesce_s=sw.coalesce_s,
        max_wait_s=sw.max_wait_s,
        cost_alpha=sw.cost_alpha,
        max_wake_attempts=sw.max_wake_attempts,
        wake_backoff_initial_s=sw.wake_backoff_initial_s,
        wake_backoff_max_s=sw.wake_backoff_max_s,
        tools=tools if tools is not None else host_tools(config),
    )


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
        if not loc and e["type"] == "value_error":
            # A rule across sections: its message names the keys and values itself.
            lines.append(rule.removeprefix("Value error, "))
            continue
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
