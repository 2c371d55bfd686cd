"""The edge client's main loop: resume the spool, enroll, move to the champion, train once per base version, spool
and send the update and telemetry, then follow `ModelAvailable` events to each new version. `run_client` runs it
in-process (tests, demo); the CLI wraps it."""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from edge_client.enrollment import certificate_due, ensure_enrolled, renew_if_due
from edge_client.errors import EdgeClientError
from edge_client.local_training import (
    LocalTrainingResult,
    adapter_summary,
    load_safeguard_inputs,
    train_local_adapters,
)
from edge_client.sidecar import AuditLog, Sidecar, load_policy
from edge_client.sidecar.audit import head_path_for
from edge_client.snapshots import LoadedBase, PulledVersion, QuantizeBits, load_base, pull_champion
from edge_client.spool import KIND_TELEMETRY, KIND_UPDATE, Deliverer, DeliveryReport, Outbox
from edge_client.state import DeviceCredential, StateDir
from edge_client.transport.bus import EventPublisher
from edge_client.transport.http import ChampionInfo, ControlPlaneClient, ControlPlaneRejected, ControlPlaneUnavailable
from edge_client.transport.retry import RetriesExhausted, RetryPolicy, call_with_retries
from fednested.adapters import ExpertLoraConfig, attach_expert_adapters
from fednested.checkpoints import (
    ADAPTERS_NAME,
    MANIFEST_NAME,
    CheckpointError,
    file_sha256,
    save_update,
    verify_version,
)
from fednested.checkpoints.safeguards import parse_round_safeguards
from fednested.config import EdgeDataSettings, EdgeModelSettings, Tier2Config
from fednested.config.training import SafeguardConfig
from fednested.data.jsonl import JsonlFormatError, read_jsonl_files
from fednested.data.records import Record
from fednested.messaging.acls import EDGE_GROUP_PREFIX
from fednested.messaging.bus import Consumer, Message, make_bus
from fednested.messaging.schemas import ModelAvailable, RoundStart, TelemetryV2
from fednested.messaging.settings import EmbeddedBusSettings, KafkaBusSettings
from fednested.messaging.topics import Topic
from fednested.training.edge import EdgeTrainConfig

StopReason = Literal["goals_met", "max_wait", "interrupted"]


def _tier2_default(model: type[BaseModel], name: str) -> Any:
    """The tier2 config's default for a setting, so settings built directly (tests) match a file that omits it."""
    return model.model_fields[name].default


# Control events name versions and rounds a device keeps in memory; a flood of (hostile) events cannot grow them
# past this: the oldest entries go first.
MAX_REMEMBERED_EVENTS = 256


def _remember(memory: dict[str, Any], key: str, value: Any) -> None:
    memory.pop(key, None)
    memory[key] = value
    while len(memory) > MAX_REMEMBERED_EVENTS:
        del memory[next(iter(memory))]


@dataclass(frozen=True)
class ClientSettings:
    """Everything one device run needs, resolved to concrete values; `from_config` builds it from a tier2 config
    file (fednested.config.Tier2Config), tests may build it directly. `adapter`, `training` and `retry` are the
    config's own dataclasses; the defaults it shares with the config are read from the config models."""

    client_id: str
    control_plane_url: str
    token_file: Path
    state_dir: Path
    policy_file: Path
    data_files: tuple[Path, ...]
    bus: KafkaBusSettings | EmbeddedBusSettings
    adapter: ExpertLoraConfig = field(default_factory=ExpertLoraConfig)
    training: EdgeTrainConfig = field(default_factory=EdgeTrainConfig)
    quantize_bits: QuantizeBits = field(default=_tier2_default(EdgeModelSettings, "quantize_bits"))
    lean_allocator: bool = field(default=_tier2_default(EdgeModelSettings, "lean_allocator"))
    display_name: str | None = None
    spool_dir: Path | None = None
    audit_log: Path | None = None
    strict_data: bool = field(default=_tier2_default(EdgeDataSettings, "strict"))
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    http_timeout_s: float = field(default=_tier2_default(Tier2Config, "http_timeout_s"))
    poll_interval_s: float = field(default=_tier2_default(Tier2Config, "poll_interval_s"))
    champion_check_interval_s: float = field(default=_tier2_default(Tier2Config, "champion_check_interval_s"))
    control_plane_ca_file: Path | None = None

    @property
    def resolved_spool_dir(self) -> Path:
        return self.spool_dir or self.state_dir / "spool"

    @property
    def resolved_audit_log(self) -> Path:
        return self.audit_log or self.state_dir / "audit" / "audit.jsonl"

    @classmethod
    def from_config(cls, config: Tier2Config) -> ClientSettings:
        """Map the tier2 config (paths already resolved against the config file's directory by load_config)."""
        return cls(
            client_id=config.client_id,
            control_plane_url=config.control_plane_url,
            token_file=config.enrollment_token_file,
            state_dir=config.state_dir,
            policy_file=config.sidecar_policy_path,
            data_files=tuple(config.data.train_files),
            strict_data=config.data.strict,
            bus=config.bus,
            # The config's sections are these dataclasses already (fednested.config): taken as they are.
            adapter=config.adapter,
            training=config.training,
            quantize_bits=config.model.quantize_bits,
            lean_allocator=config.model.lean_allocator,
            display_name=config.display_name,
            spool_dir=config.spool_dir,
            audit_log=config.audit_log_path,
            retry=config.retry,
            http_timeout_s=config.http_timeout_s,
            poll_interval_s=config.poll_interval_s,
            champion_check_interval_s=config.champion_check_interval_s,
            control_plane_ca_file=config.control_plane_ca_file,
        )


@dataclass(frozen=True)
class RunOptions:
    """When a run ends. With no goal the client runs until interrupted; with goals it stops once all are met and
    nothing is left in the spool; `max_wait_s` ends it early regardless (the report says so)."""

    rounds: int | None = None
    until_version: str | None = None
    max_wait_s: float | None = None

    def __post_init__(self) -> None:
        if self.rounds is not None and self.rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {self.rounds}")
        if self.max_wait_s is not None and self.max_wait_s <= 0:
            raise ValueError(f"max_wait_s must be positive, got {self.max_wait_s}")


@dataclass
class ClientRunReport:
    """What one run did."""

    client_id: str
    current_version: str | None = None
    versions: list[str] = field(default_factory=list)
    trained_on: list[str] = field(default_factory=list)
    updates_delivered: list[str] = field(default_factory=list)
    telemetry_delivered: int = 0
    updates_failed: list[tuple[str, str]] = field(default_factory=list)
    telemetry_failed: list[tuple[str, str]] = field(default_factory=list)
    pending: int = 0
    bad_data_lines: int = 0
    rejected_events: int = 0
    # Control events seen a second time (same event id: the control plane's relay published them again) and ignored.
    duplicate_events: int = 0
    last_error: str | None = None
    stopped_because: StopReason = "goals_met"
    duration_s: float = 0.0

    def summary(self) -> str:
        return (
            f"client {self.client_id}: version {self.current_version}, trained on {self.trained_on}, "
            f"{len(self.updates_delivered)} update(s) delivered, {self.pending} pending, "
            f"{len(self.updates_failed)} failed; stopped: {self.stopped_because}"
        )


class ClientRun:
    """State of one run; `run_client` drives it. Split into steps so each can be read (and tested) on its own."""

    def __init__(self, settings: ClientSettings, options: RunOptions, sleep: Callable[[float], None] = time.sleep):
        self.settings = settings
        self.options = options
        self.sleep = sleep
        self.started = time.monotonic()
        self.deadline = self.started + options.max_wait_s if options.max_wait_s is not None else None
        self.report = ClientRunReport(client_id=settings.client_id)
        self.state = StateDir(settings.state_dir)
        self.base: LoadedBase | None = None
        self.reported_version: str | None = None
        self.round_for_base: dict[str, str] = {}
        # base version -> the config its RoundStart carried (the round's safeguards among it), and the latest one.
        self.round_configs: dict[str, dict[str, Any]] = {}
        self.latest_round_config: dict[str, Any] | None = None
        self.updates_this_run = 0
        # version id -> (manifest sha256 the ModelAvailable event announced, where the event was read)
        self.announced: dict[str, tuple[str, str]] = {}
        self.champion_stale = True
        # When the champion was last asked for (monotonic): asked again every champion_check_interval_s even with
        # no event, so a lost ModelAvailable costs minutes.
        self.last_champion_check = -math.inf
        # Event ids of control events already handled (bounded like the other memories): a copy is ignored.
        self.seen_events: dict[str, None] = {}
        self.credential: DeviceCredential | None = None
        self.version_report_refused: str | None = None

    # -- setup ---------------------------------------------------------------------------------------------------

    def open_sidecar(self) -> Sidecar:
        audit_path = self.settings.resolved_audit_log
        # The audit log, its head anchor and the credential never leave the device, whatever the policy file says.
        policy = load_policy(self.settings.policy_file).with_local_only(
            audit_path, head_path_for(audit_path), self.state.credential_file
        )
        return Sidecar(policy=policy, audit=AuditLog(audit_path))

    def use_certificate(self, api: ControlPlaneClient, credential: DeviceCredential | None) -> None:
        """On an https control plane: trust the configured CA (else the one enrollment returned) and, once enrolled
        with a certificate, present it (mTLS). Plain http (the embedded demo) uses neither."""
        if not self.settings.control_plane_url.startswith("https://"):
            return
        ca_file = self.settings.control_plane_ca_file
        if ca_file is None and credential is not None and credential.ca_certificate:
            ca_file = self.state.ca_file
        certificate = None
        if credential is not None and credential.certificate:
            certificate = (self.state.certificate_file, self.state.device_key_file)
        api.use_tls(ca_file=ca_file, certificate=certificate)

    def renew_certificate(self, api: ControlPlaneClient, sidecar: Sidecar) -> None:
        """Renew the client certificate once a third of its lifetime is left (a long-running device outlives it);
        a failed renewal is retried on the next turn, while the current certificate still works."""
        credential = self.credential
        if credential is None or not certificate_due(credential):
            return
        try:
            self.credential = self.retrying(
                "renew certificate", lambda: renew_if_due(self.state, api, sidecar, credential)
            )
        except (RetriesExhausted, ControlPlaneRejected) as exc:
            self.report.last_error = f"certificate renewal: {exc}"
            sidecar.record("device.certificate_renewal_failed", {"error": str(exc)[:200]})
            return
        self.use_certificate(api, self.credential)

    def retrying(self, what: str, action: Callable[[], Any]) -> Any:
        return call_with_retries(
            what,
            action,
            self.settings.retry,
            retry_on=(ControlPlaneUnavailable,),
            sleep=self.sleep,
            deadline=self.deadline,
        )

    # -- versions ------------------------------------------------------------------------------------------------

    def champion_info(self, api: ControlPlaneClient) -> ChampionInfo | None:
        try:
            info: ChampionInfo = self.retrying("ask for the champion", api.champion)
        except ControlPlaneRejected as exc:
            if exc.status == 404:
                return None  # nothing promoted yet: wait for ModelAvailable
            raise
        return info

    def move_to(self, api: ControlPlaneClient, info: ChampionInfo, sidecar: Sidecar) -> None:
        if self.base is not None and self.base.version.version_id == info.version_id:
            return
        pulled: PulledVersion = pull_champion(api, self.state, self.settings.retry, info=info, deadline=self.deadline)
        previous = self.base.version.version_id if self.base is not None else None
        self.base = None  # drop the old model before loading the next: one frozen base in memory at a time
        self.base = load_base(
            pulled, quantize_bits=self.settings.quantize_bits, lean_allocator=self.settings.lean_allocator
        )
        self.state.set_current_version(pulled.version_id)
        self.report.current_version = pulled.version_id
        self.report.versions.append(pulled.version_id)
        sidecar.record("version.loaded", {"version_id": pulled.version_id, "previous": previous})

    def resume_current_version(self, sidecar: Sidecar) -> None:
        """Load the version this device ran last, if it still verifies, so an offline start can train on it."""
        version_id = self.state.current_version()
        if version_id is None:
            return
        directory = self.state.version_dir(version_id)
        try:
            manifest = verify_version(directory)
        except CheckpointError as exc:
            sidecar.record("version.resume_failed", {"version_id": version_id, "error": str(exc)[:300]})
            return
        pulled = PulledVersion(version_id, directory, manifest, file_sha256(directory / MANIFEST_NAME))
        self.base = load_base(
            pulled, quantize_bits=self.settings.quantize_bits, lean_allocator=self.settings.lean_allocator
        )
        self.report.current_version = version_id
        self.report.versions.append(version_id)
        sidecar.record("version.loaded", {"version_id": version_id, "previous": None, "resumed": True})

    def report_version(self, api: ControlPlaneClient, sidecar: Sidecar) -> None:
        current = self.report.current_version
        if current is None or current in (self.reported_version, self.version_report_refused):
            return
        try:
            api.report_version(self.settings.client_id, current)
        except ControlPlaneUnavailable as exc:
            self.report.last_error = str(exc)  # reported again on the next loop turn
            return
        except ControlPlaneRejected as exc:
            # Not worth stopping training over: say so locally, and do not ask again for this version.
            self.version_report_refused = current
            self.report.last_error = str(exc)
            sidecar.record("version.report_refused", {"version_id": current, "status": exc.status, "error": exc.detail})
            return
        self.reported_version = current

    # -- training ------------------------------------------------------------------------------------------------

    def read_records(self, sidecar: Sidecar) -> list[Record]:
        missing = [str(path) for path in self.settings.data_files if not path.is_file()]
        if missing or not self.settings.data_files:
            raise EdgeClientError(f"local data files not found: {missing or 'none configured'}; check data_files")
        try:
            result = read_jsonl_files(list(self.settings.data_files), strict=self.settings.strict_data)
        except JsonlFormatError as exc:
            raise EdgeClientError(f"local data: {exc} (strict mode stops at the first bad line)") from exc
        self.report.bad_data_lines = result.skipped
        if result.skipped:
            # Where the bad lines are (file:line and what is wrong), never their content.
            sidecar.record(
                "data.bad_lines", {"count": result.skipped, "where": [str(bad)[:200] for bad in result.bad_lines[:20]]}
            )
        return list(result.records)

    def round_safeguards(self, base_version: str) -> SafeguardConfig | None:
        """The safeguards of the window this run trains for: the RoundStart that named `base_version`, else the
        latest one announced (an asynchronous series' next windows start on the champion of their day, which may
        not be the version a device moved to since; a series keeps one config). None: the round asks for none."""
        config = self.round_configs.get(base_version, self.latest_round_config)
        if config is None:
            return None
        try:
            return parse_round_safeguards(config, where=f"the round config for {base_version}")
        except ValueError as exc:
            # The control plane checks the section when it opens the round: a bad one here was not written by it.
            raise EdgeClientError(f"{exc}; not training with safeguards the round did not validly ask for") from exc

    def training_config(self, base_version: str) -> EdgeTrainConfig:
        """The device's training config, with the round's safeguards in place of its own when the round has some."""
        safeguards = self.round_safeguards(base_version)
        training = self.settings.training
        return training if safeguards is None else replace(training, safeguards=safeguards)

    def train_and_spool(self, outbox: Outbox, sidecar: Sidecar) -> None:
        assert self.base is not None
        base_version = self.base.version.version_id
        records = self.read_records(sidecar)
        started_at = datetime.now(UTC)
        try:
            config = self.training_config(base_version)
            # Attached in place: this base now carries trained adapters, which is fine because a base version is
            # trained on once; the next version is loaded fresh by move_to.
            model = attach_expert_adapters(self.base.model, self.settings.adapter)
            version = self.base.version
            inputs = load_safeguard_inputs(model, version.directory, version.manifest, config.safeguards)
            result = train_local_adapters(model, self.base.tokenizer, records, config, inputs)
        except Exception as exc:
            self.spool_telemetry(outbox, base_version, None, started_at, outcome="failed")
            sidecar.record("training.failed", {"base_version": base_version, "error": f"{type(exc).__name__}: {exc}"})
            raise
        unusable = training_unusable(result)
        if unusable:
            # Nothing worth sending: no step ran (a budget too small for one step) or the loss diverged. Said as a
            # failed run, not an update the server would reject (or a NaN the spool cannot even write).
            self.spool_telemetry(outbox, base_version, result, started_at, outcome="failed")
            sidecar.record("training.failed", {"base_version": base_version, "error": unusable})
            raise EdgeClientError(f"training on {base_version} produced no usable update: {unusable}")
        self.spool_update(outbox, base_version, result)
        self.spool_telemetry(outbox, base_version, result, started_at, outcome="succeeded")
        self.report.trained_on.append(base_version)
        self.updates_this_run += 1
        sidecar.record(
            "training.finished",
            {
                "base_version": base_version,
                "examples": result.examples,
                "steps": result.metrics.steps,
                "tokens": result.metrics.tokens,
                "adapter_tensors": len(result.adapters),
                # the safeguards' last terms (None where off): evidence on the device that they ran
                "ewc_penalty": result.metrics.ewc_penalty,
                "distill_loss": result.metrics.distill_loss,
                "replay_records": result.metrics.replay_records,
            },
        )

    def spool_update(self, outbox: Outbox, base_version: str, result: LocalTrainingResult) -> str:
        update_id = str(uuid.uuid4())
        metrics = {
            "train_loss": float(result.metrics.final_loss),
            "steps": float(result.metrics.steps),
            "tokens": float(result.metrics.tokens),
            "duration_s": float(result.metrics.duration_s),
        }
        envelope_fields: dict[str, Any] = {
            "schema": "UpdateEnvelope",
            "schema_version": 1,
            "update_id": update_id,
            "client_id": self.settings.client_id,
            "base_version": base_version,
            "round_id": self.round_for_base.get(base_version),
            "examples": result.examples,
            "routed_tokens": result.routed_tokens,
            "metrics": metrics,
            "adapter": adapter_summary(self.settings.adapter),
            "created_at": result.finished_at.isoformat(),
        }

        def write_payload(directory: Path) -> Path:
            save_update(
                result.adapters,
                directory / "update",
                base_version=base_version,
                adapter_config=self.settings.adapter,
                metadata={"client_id": self.settings.client_id},
                update_id=update_id,
            )
            return directory / "update" / ADAPTERS_NAME

        outbox.add(
            update_id, KIND_UPDATE, Topic.UPDATES, self.settings.client_id, envelope_fields, write_payload=write_payload
        )
        return update_id

    def spool_telemetry(
        self,
        outbox: Outbox,
        base_version: str,
        result: LocalTrainingResult | None,
        started_at: datetime,
        *,
        outcome: Literal["succeeded", "failed"],
    ) -> None:
        finished_at = result.finished_at if result is not None else datetime.now(UTC)
        loss = result.metrics.final_loss if result is not None else None
        # Telemetry v2 (the data engine's signal). The local records carry no domain labels, so the report holds no
        # per-domain entries: the control plane attributes it to the domain the device was enrolled for. No DP noise
        # is drawn on the edge loss today (dp_noised false); were it drawn, per-domain losses would have to be noised
        # the same way or left out (TelemetryV2's rule).
        event = {
            "schema": TelemetryV2.SCHEMA,
            "schema_version": TelemetryV2.SCHEMA_VERSION,
            "client_id": self.settings.client_id,
            "base_version": base_version,
            "round_id": self.round_for_base.get(base_version),
            "loss": loss if loss is None or loss == loss else None,  # NaN (no step ran) is not a loss
            "steps": result.metrics.steps if result is not None else 0,
            "tokens": result.metrics.tokens if result is not None else 0,
            "duration_s": max(0.0, (finished_at - started_at).total_seconds()),
            "outcome": outcome,
            "dp_noised": False,
            "domains": [],
            "started_at": started_at.isoformat(),
            "finished_at": finished_at.isoformat(),
        }
        outbox.add(str(uuid.uuid4()), KIND_TELEMETRY, Topic.TELEMETRY, self.settings.client_id, event)

    # -- loop ----------------------------------------------------------------------------------------------------

    def needs_training(self, outbox: Outbox) -> bool:
        if self.base is None:
            return False
        if self.options.rounds is not None and self.updates_this_run >= self.options.rounds:
            return False
        # One update per base version, remembered across restarts through the spool itself.
        return self.base.version.version_id not in outbox.base_versions()

    def goals_met(self, outbox: Outbox) -> bool:
        if self.options.rounds is None and self.options.until_version is None:
            return False
        if outbox.pending():
            return False
        # A refused update (kept in spool/failed/, reported) is finished business for the round count.
        finished = len(self.report.updates_delivered) + len(self.report.updates_failed)
        if self.options.rounds is not None and finished < self.options.rounds:
            return False
        if self.options.until_version is not None:
            if self.report.current_version != self.options.until_version:
                return False
            if self.options.until_version not in (self.reported_version, self.version_report_refused):
                return False
        return True

    def absorb(self, delivery: DeliveryReport, outbox: Outbox) -> None:
        kinds = outbox.kinds()
        for item_id in delivery.delivered:
            if kinds.get(item_id) == KIND_UPDATE:
                self.report.updates_delivered.append(item_id)
            else:
                self.report.telemetry_delivered += 1
        for item_id, reason in delivery.failed:
            failed = self.report.updates_failed if kinds.get(item_id) == KIND_UPDATE else self.report.telemetry_failed
            failed.append((item_id, reason))
        self.report.pending = delivery.pending
        if delivery.last_error:
            self.report.last_error = delivery.last_error

    def handle_control(self, message: Message, sidecar: Sidecar) -> None:
        """Note what a control event asks for; the loop acts on it (so a failed download is retried, not lost)."""
        if not message.valid:
            self.report.rejected_events += 1
            sidecar.record("control.rejected_event", {"where": message.where(), "error": str(message.error)[:300]})
            return
        event = message.event
        if isinstance(event, RoundStart | ModelAvailable) and event.event_id is not None:
            event_id = str(event.event_id)
            if event_id in self.seen_events:
                self.report.duplicate_events += 1
                sidecar.record("control.duplicate_event", {"where": message.where(), "event_id": event_id})
                return
            _remember(self.seen_events, event_id, None)
        if isinstance(event, RoundStart):
            _remember(self.round_for_base, event.base_version, event.round_id)
            _remember(self.round_configs, event.base_version, dict(event.config))
            self.latest_round_config = dict(event.config)
        elif (
            isinstance(event, ModelAvailable)
            and event.alias == "champion"
            and event.version_id != self.report.current_version
        ):
            _remember(self.announced, event.version_id, (event.manifest_sha256, message.where()))
            self.champion_stale = True

    def read_waiting_events(self, consumer: Consumer, sidecar: Sidecar) -> None:
        """Handle the control events already on the bus without waiting for more (bounded: a flood cannot hold the
        device here)."""
        for _ in range(MAX_REMEMBERED_EVENTS):
            message = consumer.poll(0.0)
            if message is None:
                return
            self.handle_control(message, sidecar)
            consumer.commit(message)

    def sync_champion(self, api: ControlPlaneClient, sidecar: Sidecar) -> None:
        """Move to whatever the API says the champion is now (it may be newer than the last event)."""
        info = self.champion_info(api)
        if info is None:
            return
        announced = self.announced.pop(info.version_id, None)
        if announced is not None and announced[0] != info.manifest_sha256:
            # A forged or stale event must not stop the device: it is recorded and forgotten. The API stays the
            # authority, and move_to still checks every downloaded byte against the API's manifest hash.
            problem = (
                f"ModelAvailable for {info.version_id} at {announced[1]} announces manifest sha256 {announced[0]}, "
                f"but the API says {info.manifest_sha256}; the event is ignored"
            )
            sidecar.record("control.manifest_mismatch", {"version_id": info.version_id, "event": announced[0]})
            self.report.last_error = problem
        self.move_to(api, info, sidecar)

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def run(self) -> ClientRunReport:
        with self.state.locked():
            sidecar = self.open_sidecar()
            sidecar.record("client.started", {"client_id": self.settings.client_id, "options": self.options.__dict__})
            try:
                self._run(sidecar)
            except KeyboardInterrupt:
                self.report.stopped_because = "interrupted"
            finally:
                self.report.duration_s = time.monotonic() - self.started
                sidecar.record(
                    "client.stopped",
                    {
                        "stopped_because": self.report.stopped_because,
                        "pending": self.report.pending,
                        "current_version": self.report.current_version,
                    },
                )
        return self.report

    def _run(self, sidecar: Sidecar) -> None:
        settings = self.settings
        outbox = Outbox(settings.resolved_spool_dir)
        self.report.pending = len(outbox.pending())
        with ControlPlaneClient(settings.control_plane_url, sidecar, timeout_s=settings.http_timeout_s) as api:
            self.use_certificate(api, None)
            credential = self.retrying(
                "enroll",
                lambda: ensure_enrolled(
                    self.state,
                    api,
                    sidecar,
                    client_id=settings.client_id,
                    token_file=settings.token_file,
                    display_name=settings.display_name,
                ),
            )
            api.api_token = credential.api_token
            self.use_certificate(api, credential)
            self.credential = credential
            self.renew_certificate(api, sidecar)
            # The bus opens only now: on Kafka with TLS the device authenticates with the certificate enrollment
            # just wrote to the state directory.
            with make_bus(settings.bus) as bus:
                deliverer = Deliverer(
                    outbox,
                    api,
                    EventPublisher(bus, settings.bus, sidecar),
                    signing_key=self.state.device_key(),
                    retry=settings.retry,
                    sleep=self.sleep,
                    on_event=sidecar.record,
                )
                # Whatever a previous run left in the spool goes first: it was trained and promised already.
                self.absorb(deliverer.deliver_pending(deadline=self.deadline), outbox)
                with bus.consumer(f"{EDGE_GROUP_PREFIX}{settings.client_id}", [Topic.CONTROL_ROUNDS]) as consumer:
                    self._loop(api, sidecar, outbox, deliverer, consumer)

    def _loop(
        self, api: ControlPlaneClient, sidecar: Sidecar, outbox: Outbox, deliverer: Deliverer, consumer: Consumer
    ) -> None:
        self.resume_current_version(sidecar)
        while True:
            self.renew_certificate(api, sidecar)
            if time.monotonic() - self.last_champion_check >= self.settings.champion_check_interval_s:
                self.champion_stale = True  # the scheduled check: whether or not an event said so
            if self.champion_stale:
                try:
                    self.sync_champion(api, sidecar)
                except RetriesExhausted as exc:
                    self.report.last_error = str(exc)  # still stale: tried again on the next turn
                else:
                    self.champion_stale = False
                    self.last_champion_check = time.monotonic()
            self.report_version(api, sidecar)
            if self.needs_training(outbox):
                # The round's config decides the safeguards: read the announcements already waiting first.
                self.read_waiting_events(consumer, sidecar)
                self.train_and_spool(outbox, sidecar)
            if outbox.pending():
                self.absorb(deliverer.deliver_pending(deadline=self.deadline), outbox)
            if self.goals_met(outbox):
                self.report.stopped_because = "goals_met"
                return
            remaining = self.remaining()
            if remaining is not None and remaining <= 0:
                self.report.stopped_because = "max_wait"
                self.report.pending = len(outbox.pending())
                return
            timeout = (
                self.settings.poll_interval_s if remaining is None else min(self.settings.poll_interval_s, remaining)
            )
            message = consumer.poll(max(0.0, timeout))
            if message is not None:
                self.handle_control(message, sidecar)
                # The event is recorded in memory; were the process to die before acting on it, the next start
                # asks the API for the champion anyway, so committing here loses nothing.
                consumer.commit(message)


def run_client(
    config: Tier2Config | ClientSettings,
    options: RunOptions | None = None,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> ClientRunReport:
    """Run one edge client until its goals are met (see RunOptions); returns what it did. Raises EdgeClientError
    (with a message naming what was wrong and where) when it cannot go on."""
    settings = config if isinstance(config, ClientSettings) else ClientSettings.from_config(config)
    return ClientRun(settings, options or RunOptions(), sleep=sleep).run()


def training_unusable(result: LocalTrainingResult) -> str | None:
    """Why a local training result must not leave the device as an update, or None when it may."""
    if result.metrics.steps == 0:
        return "no optimizer step ran within the training budget (raise training.max_seconds or max_steps)"
    if not math.isfinite(result.metrics.final_loss):
        return f"the training loss is not finite ({result.metrics.final_loss}): the adapters diverged"
    return None
