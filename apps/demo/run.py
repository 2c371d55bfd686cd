"""The demo, step by step: a fresh control plane, v1 as champion, three edge devices in different domains and of
different speeds, and an asynchronous window series (K = 2): train → updates → candidate on the champion →
per-domain evaluation → approval → every device moves on. The slowest device comes online only once the first
window has closed (as a device that was offline would), trains on v1, which is still the champion while the first
candidate waits for approval, and its update is applied to the next champion with its staleness weight. Starting it
then, rather than counting on it being slow, makes the story the same whatever the machine's load.

Every state change goes through the apps' services, exactly as the API and the workers make them; the control
plane's HTTP server, the ingest worker, the outbox relay, the data engine (telemetry consumer) and the devices are
separate processes sharing the SQLite files. SIGTERM stops them all, as Ctrl-C does.
"""

import json
import secrets
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import timedelta
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

from django.conf import settings
from django.core.management import call_command
from django.utils import timezone

from apps.accounts.choices import Role
from apps.accounts.models import User
from apps.accounts.services import create_user_with_role
from apps.console.evaluation import domain_losses
from apps.dataengine.models import DeviceSignal, TelemetryRejection
from apps.demo.bootstrap import BootstrapConfig, FirstVersion, build_first_version, demo_corpus, heldout_by_domain
from apps.demo.devices import DemoDevice, EdgeTrainingPlan, client_command, client_report, prepare_device
from apps.demo.environment import DemoPaths
from apps.demo.processes import DemoError, ManagedProcess, start_process, wait_for_http
from apps.demo.progress import Progress
from apps.demo.report import AppliedUpdate, GateOutcome, VersionScores, gate_table, loss_table, staleness_table
from apps.federation.choices import TaskKind, TaskStatus, UpdateStatus
from apps.federation.models import EdgeDevice, Round, TrainingTask, Update
from apps.federation.safeguards import write_safeguard_files
from apps.federation.services import create_training_task, issue_enrollment_token, open_round
from apps.governance.actors import Actor
from apps.governance.choices import ApprovalStatus
from apps.governance.gate import gate_verdict
from apps.governance.models import ApprovalRequest
from apps.governance.services import approve_version, reject_version
from apps.outbox.choices import OutboxKind
from apps.outbox.models import OutboxEvent
from apps.registry.models import ModelVersion
from apps.registry.services import create_model_family, register_saved_version
from fednested.data import Record, write_jsonl
from fednested.messaging import Topic

# How long the summary waits for the data engine to store the devices' last telemetry reports (it reads them within
# a poll or two of their arrival; the wait only covers the last ones, sent as the devices finished).
SIGNALS_WAIT_S = 60.0
# Domains the devices train on, in order: the first `devices` of them are used, one device each.
DEVICE_DOMAINS = ("medical", "legal", "recipes", "telemetry", "code")
FAMILY_NAME = "tiny-moe"
FIRST_VERSION = "v1"
# The asynchronous window series the demo opens, and its buffer size: two updates make a candidate, so a device
# that reports late lands in a later window than the updates of its base version.
SERIES = "demo"
WINDOW_K = 2
FINISHED_TASK_STATUSES = (TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED)
# The promotion gate the demo federation runs with (--gate-max-increase): no domain a device does not train on may
# get more than this much worse (in nats) than the candidate's parent or the champion.
PROTECTED_MAX_INCREASE_NATS = 0.01
# EWC strength the demo's rounds ask the devices for (--ewc-lambda): the penalty λ/2·Σ F·ΔW² over the adapters' ΔW,
# with the version's Fisher normalised to mean 1; 0 opens the rounds without safeguards. Deliberately light, so the
# gate has something to decide (measured on the default demo, docs/forgetting-and-promotion-gate.md): without EWC the
# second candidate makes code 0.475 and telemetry 0.148 nats worse; λ = 0.03 leaves +0.015 and +0.023 (the gate
# holds it) while the trained domains learn almost as much; from λ = 0.1 they get at most 0.002 worse.
DEMO_EWC_LAMBDA = 0.03

T = TypeVar("T")


@dataclass(frozen=True)
class DemoOptions:
    """What `manage.py demo` was asked for."""

    root: Path
    port: int = 8000
    devices: int = 3
    rounds: int = 2
    serve: bool = True
    step_timeout_s: float = 900.0
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    edge: EdgeTrainingPlan = field(default_factory=EdgeTrainingPlan)
    ewc_lambda: float = DEMO_EWC_LAMBDA
    gate_max_increase: float = PROTECTED_MAX_INCREASE_NATS

    @property
    def protected_domains(self) -> tuple[str, ...]:
        """The domains no device trains on: the gate protects them and the rounds' EWC holds them."""
        return DEVICE_DOMAINS[self.devices :]

    def __post_init__(self) -> None:
        if not 3 <= self.devices <= len(DEVICE_DOMAINS):
            raise ValueError(f"devices must be between 3 and {len(DEVICE_DOMAINS)}, got {self.devices}")
        if self.rounds < 1:
            raise ValueError(f"rounds must be at least 1, got {self.rounds}")
        if not 0 <= self.ewc_lambda < float("inf"):
            raise ValueError(f"ewc_lambda must be a finite number >= 0, got {self.ewc_lambda}")
        if not 0 <= self.gate_max_increase < float("inf"):
            raise ValueError(f"gate_max_increase must be a finite number >= 0, got {self.gate_max_increase}")


@dataclass(frozen=True)
class Cast:
    """The demo's people: an engineer who opens rounds and requests approvals, and an officer who decides."""

    officer: User
    officer_password: str
    engineer: User
    engineer_password: str


def window_id(number: int) -> str:
    """The id of the series' `number`th window (apps.federation.services.continue_series names the next ones)."""
    return SERIES if number == 1 else f"{SERIES}.{number}"


def candidate_of(number: int) -> str:
    """The candidate id the aggregation worker gives window `number` (workers.aggregation.candidate_version_id)."""
    return f"{window_id(number)}-candidate"


def steps_factor(index: int, devices: int) -> int:
    """How many times the base step budget device `index` trains per run: 1×, 3×, 5×, … and the last one the slowest
    by far, so that the order in which updates arrive (and so each window's members) does not hang on timing noise:
    loading and enrolling take seconds, a step of the tiny model a tenth of one."""
    return 4 * (devices - 1) if index == devices - 1 else 1 + 2 * index


def create_cast() -> Cast:
    """An officer and an engineer with fresh random passwords (printed at the end, for signing in)."""
    passwords = [secrets.token_urlsafe(9) for _ in range(2)]
    officer = create_user_with_role(
        username="olivia", role=Role.OFFICER, password=passwords[0], actor=Actor.automation("demo")
    )
    engineer = create_user_with_role(
        username="eric", role=Role.ENGINEER, password=passwords[1], actor=Actor.automation("demo")
    )
    return Cast(officer=officer, officer_password=passwords[0], engineer=engineer, engineer_password=passwords[1])


def register_first_version(first: FirstVersion, engineer: User) -> ModelVersion:
    """Register the bootstrapped model as family tiny-moe's first (candidate) version, as an engineer would."""
    manifest = first.manifest
    family = create_model_family(
        name=FAMILY_NAME,
        architecture=str(manifest.architecture.get("family", "mixtral")),
        config=dict(manifest.architecture.get("config") or {}),
        description="The demo's tiny Mixtral-style MoE.",
        actor=engineer,
    )
    lineage = manifest.lineage
    return register_saved_version(
        first.directory,
        family=family,
        actor=engineer,
        datasets=lineage.get("datasets", []),
        runs=lineage.get("runs", []),
    )


def interrupt_on_sigterm(signum: int, frame: FrameType | None) -> None:
    """Turn the first SIGTERM into a KeyboardInterrupt; further ones are ignored so that they cannot cut short the
    stopping of the children that the first one started."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


class Demo:
    """One run of the demo; `run()` drives it and always stops the processes it started."""

    def __init__(self, options: DemoOptions, paths: DemoPaths, env: dict[str, str], progress: Progress) -> None:
        self.options = options
        self.paths = paths
        self.env = env
        self.progress = progress
        self.processes: list[ManagedProcess] = []
        self.clients: dict[str, ManagedProcess] = {}
        self.devices: list[DemoDevice] = []
        self.versions: list[ModelVersion] = []
        self.seen_updates: dict[str, str] = {}
        self.device_records: dict[str, list[Record]] = {}
        self.gate_outcomes: list[GateOutcome] = []
        # Telemetry reports the devices say they delivered (their run reports): what the data engine must have read.
        self.telemetry_delivered = 0
        self.url = ""

    # -- waiting ---------------------------------------------------------------------------------------------------

    def check_processes(self) -> None:
        for process in self.processes:
            if not process.running:
                raise process.failure("stopped unexpectedly")
        for process in self.clients.values():
            if not process.running and process.popen.returncode != 0:
                raise process.failure("failed")

    def report_updates(self) -> None:
        """One progress line per update that arrived or changed status since the last look."""
        for update in Update.objects.select_related("device", "base_version", "round").order_by("received_at", "id"):
            if self.seen_updates.get(update.update_id) == update.status:
                continue
            self.seen_updates[update.update_id] = update.status
            reason = f" — {update.rejection_code}: {update.rejection_message}" if update.rejection_code else ""
            round_name = f"window {update.round.round_id}" if update.round is not None else "waiting for a window"
            staleness = f", τ={update.staleness}" if update.status == "applied" else ""
            self.progress.step(
                f"  update {update.update_id[:8]} from {update.device.client_id} on {update.base_version.version_id}"
                f" ({round_name}{staleness}): {update.status}{reason}"
            )

    def wait_for(self, what: str, check: Callable[[], T | None]) -> T:
        """Poll `check` until it returns something, reporting updates and failing if a process dies or time runs out."""
        deadline = time.monotonic() + self.options.step_timeout_s
        while time.monotonic() < deadline:
            self.check_processes()
            self.report_updates()
            result = check()
            if result is not None:
                return result
            time.sleep(1.0)
        raise DemoError(
            f"timed out after {self.options.step_timeout_s:.0f} s waiting for {what}; logs: {self.paths.logs}"
        )

    # -- steps -----------------------------------------------------------------------------------------------------

    def prepare_database(self) -> Cast:
        self.progress.step(f"Migrating a fresh demo database at {self.paths.database}")
        call_command("migrate", interactive=False, verbosity=0)
        cast = create_cast()
        self.progress.step("Created the demo cast: olivia (governance officer) and eric (ML engineer)")
        return cast

    def bootstrap(self, cast: Cast) -> ModelVersion:
        config = self.options.bootstrap
        corpus = demo_corpus(config)
        self.progress.step(
            f"Generated a synthetic corpus: {len(corpus)} domains × {config.train_samples} train / "
            f"{config.heldout_samples} held-out samples"
        )
        heldout_dir = self.paths.artifacts / "heldout"
        for domain, records in heldout_by_domain(corpus).items():
            write_jsonl(heldout_dir / f"{domain}.jsonl", records)
        self.write_promotion_gate()
        self.progress.step(
            f"Training a BPE tokenizer and pre-training the '{config.preset}' model on a general mix "
            f"({config.pretrain_steps} steps; the Tier-1 stand-in)"
        )
        first = build_first_version(
            corpus,
            config,
            self.paths.artifacts / "versions" / FIRST_VERSION,
            # The same files (its Fisher) the aggregation worker writes for every candidate.
            safeguard_files=lambda model, tokenizer, folder: write_safeguard_files(
                model, tokenizer, folder, version_id=FIRST_VERSION
            ),
        )
        if first.pretraining is not None:
            curve = first.pretraining.loss_curve
            self.progress.step(
                f"Pre-trained in {first.pretraining.duration_s:.0f} s: loss {curve[0]:.2f} → {curve[-1]:.2f}"
            )
        version = register_first_version(first, cast.engineer)
        self.progress.step(f"Registered {version.version_id} ({len(first.manifest.files)} files, sha256-verified)")
        fisher = first.manifest.lineage.get("safeguards", {}).get("fisher")
        if fisher:
            self.progress.step(
                "  it ships fisher.safetensors: the diagonal Fisher of its expert weights on "
                f"{', '.join(fisher['domains'])} (numbers about weights: no record leaves the control plane), for "
                "the devices' EWC penalty"
            )
        request = self.evaluate(version, cast.engineer)
        approve_version(request, actor=cast.officer, reason="Initial model: the baseline for the federated rounds.")
        self.progress.step(
            f"{request.requested_by.username} asked for approval of {version.version_id}; olivia approved it: "
            "it is the champion"
        )
        self.versions.append(version)
        self.device_records = {domain: corpus[domain].mixed_records("train") for domain in DEVICE_DOMAINS}
        return version

    def write_promotion_gate(self) -> None:
        """The federation's gate (FEDNESTED_PROMOTION_GATE points here in the demo's environment): the domains no
        device trains on may get at most PROTECTED_MAX_INCREASE_NATS worse than the parent and the champion."""
        protected = self.options.protected_domains
        gate = {
            "protected": {
                domain: {"max_increase_nats": self.options.gate_max_increase, "against": ["parent", "champion"]}
                for domain in protected
            }
        }
        self.paths.promotion_gate.write_text(json.dumps(gate, indent=2) + "\n", encoding="utf-8")
        if protected:
            self.progress.step(
                f"Promotion gate: {', '.join(protected)} (no device trains there) may get at most "
                f"{self.options.gate_max_increase} nats worse than a candidate's parent or the champion"
            )

    def evaluate(self, version: ModelVersion, actor: User) -> ApprovalRequest:
        """Run the evaluation job on `version` (as for any candidate): it records the scores and asks for approval."""
        self.progress.step(f"Evaluating {version.version_id} on every domain's held-out set")
        created = create_training_task(kind=TaskKind.EVALUATION, actor=actor, params={"version_id": version.version_id})
        # Without a broker the job runs in a thread of this process once the row committed; its row says how it went.
        task = self.wait_for(
            f"the evaluation of {version.version_id}",
            lambda: TrainingTask.objects.filter(pk=created.pk, status__in=FINISHED_TASK_STATUSES).first(),
        )
        if task.status != TaskStatus.SUCCEEDED:
            raise DemoError(f"evaluation of {version.version_id} {task.status}: {task.error or 'no error recorded'}")
        losses = domain_losses(version)
        self.progress.step("  " + ", ".join(f"{domain} {loss:.3f}" for domain, loss in losses.items()))
        request = ApprovalRequest.objects.filter(version=version, status=ApprovalStatus.PENDING).first()
        if request is None:
            raise DemoError(f"the evaluation of {version.version_id} opened no approval request")
        return request

    def prepare_devices(self, cast: Cast) -> None:
        self.url = f"http://127.0.0.1:{self.options.port}"
        count = self.options.devices
        for index, domain in enumerate(DEVICE_DOMAINS[:count], start=1):
            client_id = f"edge-{domain}-{index:02d}"
            factor = steps_factor(index - 1, count)
            device = DemoDevice(
                client_id=client_id, domain=domain, directory=self.paths.devices / client_id, steps_factor=factor
            )
            _, token = issue_enrollment_token(actor=cast.engineer, note=f"demo device {client_id}", domain=domain)
            prepare_device(
                device,
                records=self.device_records[domain],
                enrollment_token=token,
                control_plane_url=self.url,
                bus_path=self.paths.bus,
                # More steps at a proportionally smaller learning rate: the same amount of learning as the others,
                # with `factor` times the compute, i.e. a slower device rather than a more aggressive one.
                plan=replace(
                    self.options.edge,
                    max_steps=self.options.edge.max_steps * factor,
                    learning_rate=self.options.edge.learning_rate / factor,
                ),
                seed=self.options.bootstrap.seed + index,
            )
            self.devices.append(device)
        listing = ", ".join(
            f"{d.client_id} ({d.domain}, {self.options.edge.max_steps * d.steps_factor} steps per run at "
            f"1/{d.steps_factor} the learning rate)"
            for d in self.devices
        )
        self.progress.step(f"Prepared {len(self.devices)} devices with private data and one-time tokens: {listing}")
        self.progress.step(
            f"  {self.slow_device.client_id} is the slow one and comes online late: its update on v1 will arrive "
            "after the first candidate"
        )

    @property
    def slow_device(self) -> DemoDevice:
        return self.devices[-1]

    def start_control_plane(self) -> None:
        manage = str(Path(settings.BASE_DIR) / "manage.py")
        server = start_process(
            "control-plane server",
            # --insecure: runserver serves the console's static files only under DEBUG otherwise, and the demo's
            # server on loopback needs no separate static file server.
            [sys.executable, manage, "runserver", "--noreload", "--insecure", f"127.0.0.1:{self.options.port}"],
            env=self.env,
            log_path=self.paths.logs / "server.log",
            cwd=Path(settings.BASE_DIR),
        )
        self.processes.append(server)
        # The workers start while the server does: each takes seconds to import its stack, and the relay must be up
        # to announce the window before the devices train (its RoundStart carries the safeguards).
        worker = start_process(
            "ingest worker",
            [sys.executable, "-m", "workers.ingest", "--poll-timeout", "0.5"],
            env=self.env,
            log_path=self.paths.logs / "ingest.log",
            cwd=Path(settings.BASE_DIR),
        )
        self.processes.append(worker)
        relay = start_process(
            "outbox relay",
            [sys.executable, "-m", "workers.relay", "--poll-interval", "0.2"],
            env=self.env,
            log_path=self.paths.logs / "relay.log",
            cwd=Path(settings.BASE_DIR),
        )
        self.processes.append(relay)
        # The data engine reads the devices' telemetry off the same embedded bus the ingest worker reads updates from
        # (its own consumer group and offsets), and stores each report's per-domain figures as signals.
        engine = start_process(
            "data engine",
            [sys.executable, "-m", "workers.telemetry", "--poll-timeout", "0.5"],
            env=self.env,
            log_path=self.paths.logs / "data-engine.log",
            cwd=Path(settings.BASE_DIR),
        )
        self.processes.append(engine)
        wait_for_http(f"{self.url}/admin/login/", server, timeout_s=120)
        self.progress.step(f"Control plane serving at {self.url}/ (log: {server.log_path})")
        self.progress.step(f"Ingest worker consuming updates.experts.local (log: {worker.log_path})")
        self.progress.step(f"Outbox relay publishing control events as they commit (log: {relay.log_path})")
        self.progress.step(
            f"Data engine consuming {Topic.TELEMETRY.value} and {Topic.TASKS.value} (log: {engine.log_path})"
        )

    def open_window(self, base: ModelVersion, cast: Cast) -> None:
        # EWC on the protected domains' Fisher, which every version ships (none protected: nothing to hold).
        wanted = self.options.protected_domains and self.options.ewc_lambda > 0
        safeguards = {"ewc_lambda": self.options.ewc_lambda} if wanted else {}
        open_round(
            base_version=base,
            buffer_size_k=WINDOW_K,
            deadline_at=timezone.now() + timedelta(seconds=self.options.step_timeout_s),
            actor=cast.engineer,
            round_id=window_id(1),
            config={"safeguards": safeguards} if safeguards else {},
        )
        self.progress.step(
            f"eric opened the asynchronous window series '{SERIES}' (K={WINDOW_K}): updates on v1 or any later "
            "champion are taken, each aggregate goes onto the champion of its day, and the next window opens itself"
        )
        if safeguards:
            self.progress.step(
                f"  its config asks the devices for EWC (λ={self.options.ewc_lambda}) against the Fisher their "
                "version ships"
            )
        # A device reads the safeguards from the window's RoundStart: the devices start once it is on the bus.
        self.wait_for(
            "the relay to announce the window",
            lambda: (
                None if OutboxEvent.objects.filter(kind=OutboxKind.BUS_EVENT, sent_at__isnull=True).exists() else True
            ),
        )

    def start_client(self, device: DemoDevice) -> None:
        # The slow device trains once (on v1): its one late update is the point. The others train on every champion
        # until the last candidate.
        rounds = 1 if device is self.slow_device else self.options.rounds
        argv = client_command(
            device,
            rounds=rounds,
            until_version=candidate_of(self.options.rounds),
            max_wait_s=self.options.step_timeout_s * (self.options.rounds + 2),
        )
        self.clients[device.client_id] = start_process(
            f"edge client {device.client_id}", argv, env=self.env, log_path=device.log_path, cwd=device.directory
        )

    def start_clients(self) -> None:
        """Every device but the slow one, which comes online once the first window has closed (`start_late_client`)."""
        on_time = [device for device in self.devices if device is not self.slow_device]
        for device in on_time:
            self.start_client(device)
        self.progress.step(
            f"Started {len(on_time)} edge clients (`fednested tier2 run-client`); each trains once per champion"
        )

    def start_late_client(self, first: ModelVersion) -> None:
        self.start_client(self.slow_device)
        self.progress.step(
            f"{self.slow_device.client_id} comes online: {first.version_id} awaits approval, so it trains on "
            f"{FIRST_VERSION}, the champion; the first window is closed, so its update will wait for the next one"
        )

    def late_updates_waiting(self, first: ModelVersion) -> None:
        """Before the first approval: every device's update on v1 has arrived; those the first candidate did not take
        wait in the next window and will be one promotion stale once it is champion. (The slow device's, which came
        online after the first window closed.)"""

        def all_arrived() -> list[Update] | None:
            updates = list(
                Update.objects.filter(base_version__version_id=FIRST_VERSION).select_related("device", "round")
            )
            return updates if len({update.device_id for update in updates}) >= len(self.devices) else None

        updates = self.wait_for("every device's update on v1", all_arrived)
        for update in updates:
            if update.applied_in_id is None and update.status == UpdateStatus.BUFFERED:
                where = f"window {update.round.round_id}" if update.round is not None else "waiting for a window"
                self.progress.step(
                    f"  while olivia reviews {first.version_id}, {update.device.client_id}'s update on {FIRST_VERSION} "
                    f"arrives: buffered ({where}); once {first.version_id} is champion it is one promotion stale (τ=1)"
                )

    def candidate(self, number: int) -> ModelVersion:
        version_id = candidate_of(number)
        version = self.wait_for(
            f"candidate {version_id}", lambda: ModelVersion.objects.filter(version_id=version_id).first()
        )
        applied = Update.objects.filter(applied_in=version).select_related("device", "base_version")
        parts = ", ".join(
            f"{update.device.client_id} on {update.base_version.version_id} (τ={update.staleness})"
            for update in applied
        )
        self.progress.step(
            f"Window {window_id(number)}: the aggregation worker applied {parts} to the champion "
            f"{version.parent.version_id if version.parent else '-'}: {version_id}"
        )
        return version

    def approval_request(self, version: ModelVersion) -> ApprovalRequest:
        def pending() -> ApprovalRequest | None:
            failed = TrainingTask.objects.filter(
                kind=TaskKind.EVALUATION, params__version_id=version.version_id, status=TaskStatus.FAILED
            ).first()
            if failed is not None:
                raise DemoError(f"evaluation of {version.version_id} failed: {failed.error}")
            return ApprovalRequest.objects.filter(version=version, status=ApprovalStatus.PENDING).first()

        request = self.wait_for(f"the evaluation and approval request of {version.version_id}", pending)
        losses, parent = domain_losses(version), domain_losses(version.parent) if version.parent else {}
        changes = ", ".join(
            f"{domain} {loss:.3f} ({loss - parent[domain]:+.3f})" if domain in parent else f"{domain} {loss:.3f}"
            for domain, loss in losses.items()
        )
        self.progress.step(f"  evaluated: {changes}")
        self.progress.step(f"  {request.requested_by.username} requested approval of {version.version_id}")
        return request

    def decide(self, request: ApprovalRequest, cast: Cast) -> bool:
        """olivia approves the candidate unless the promotion gate holds it; a held one she rejects, quoting the gate,
        and the federated loop ends there (the champion stays). True when it was approved."""
        version = request.version
        verdict = gate_verdict(version)
        outcome = GateOutcome(
            version_id=version.version_id,
            held=verdict.held,
            reasons=tuple(breach.describe() for breach in verdict.breaches)
            or ((verdict.error,) if verdict.error else ()),
        )
        self.gate_outcomes.append(outcome)
        self.versions.append(version)
        if verdict.held:
            self.progress.step(f"  the promotion gate holds {version.version_id}: {verdict.summary()}")
            reject_version(
                request,
                actor=cast.officer,
                reason=f"Held by the promotion gate, not promoted: {verdict.summary()}"[:2000],
            )
            self.progress.step(
                f"olivia rejected {version.version_id} (Approve is disabled while the gate holds it); the champion "
                "stays, and the demo's rounds end here"
            )
            return False
        approve_version(
            request,
            actor=cast.officer,
            reason=f"Per-domain losses reviewed in the demo, within the gate; promoting {version.version_id}.",
        )
        passed = " (within the promotion gate)" if verdict.configured else ""
        self.progress.step(f"olivia approved {version.version_id}{passed}; champion moved, devices told")
        return True

    def devices_on(self, version: ModelVersion) -> None:
        total = len(self.devices)

        def all_moved() -> bool | None:
            moved = EdgeDevice.objects.filter(current_version=version).count()
            return True if moved == total else None

        self.wait_for(f"every device to report {version.version_id}", all_moved)
        self.progress.step(f"  all {total} devices report {version.version_id} as their current version")

    def finish_clients(self) -> None:
        held = any(outcome.held for outcome in self.gate_outcomes)
        for client_id, process in self.clients.items():
            if held:
                # No new champion will come for the devices to move to: once their updates are in, they are stopped.
                self.wait_for(f"{client_id}'s updates to be delivered", partial(self.delivered_everything, client_id))
                process.stop()
            deadline = time.monotonic() + self.options.step_timeout_s
            while process.running and time.monotonic() < deadline:
                time.sleep(0.5)
            if process.running or process.popen.returncode != 0:
                raise process.failure("did not finish")
            report: dict[str, Any] = client_report(process.log_path) or {}
            self.telemetry_delivered += int(report.get("telemetry_delivered", 0))
            self.progress.step(
                f"  {client_id}: trained on {report.get('trained_on')}, delivered "
                f"{len(report.get('updates_delivered', []))} updates, now on {report.get('current_version')}"
            )

    def delivered_everything(self, client_id: str) -> bool | None:
        """Whether `client_id` has nothing left to send: its client exited or its spool is empty."""
        process = self.clients[client_id]
        if not process.running:
            return True
        device = next(device for device in self.devices if device.client_id == client_id)
        pending = device.state_dir / "spool" / "pending"
        return True if not pending.is_dir() or not any(pending.iterdir()) else None

    def telemetry_reports_read(self) -> int:
        """Telemetry reports the data engine has read: those stored as signals (one per report and domain) and those
        it refused."""
        stored = DeviceSignal.objects.values("report_sha256").distinct().count()
        return stored + TelemetryRejection.objects.filter(where__startswith=Topic.TELEMETRY.value).count()

    def signals_caught_up(self) -> None:
        """Give the data engine a moment to read every telemetry report the devices delivered, then say what it
        stored. Bounded, and never a failure: a report with no domain in it is read but stores nothing (docs/
        data-engine.md), so the count cannot always reach the devices' own."""
        deadline = time.monotonic() + min(self.options.step_timeout_s, SIGNALS_WAIT_S)
        while self.telemetry_reports_read() < self.telemetry_delivered and time.monotonic() < deadline:
            self.check_processes()
            time.sleep(0.5)
        signals = DeviceSignal.objects.all()
        domains = sorted(set(signals.values_list("domain", flat=True)))
        refused = TelemetryRejection.objects.count()
        self.progress.step(
            f"Data engine stored {signals.count()} signals (per-domain loss and tokens of each training run) from "
            f"{signals.values('report_sha256').distinct().count()} of the {self.telemetry_delivered} telemetry reports "
            f"the devices delivered, domains {', '.join(domains) or 'none'}; {refused} record(s) refused"
            + (f" (why: {self.paths.logs / 'data-engine.log'}, admin: Data engine)" if refused else "")
        )

    def mlflow_caught_up(self) -> None:
        """Wait for the relay to mirror every job and version into the demo's MLflow store (docs/mlflow.md), then
        say what it holds; nothing when the mirror is off."""
        from apps.governance.mlflow_sync import mirror_enabled, mlflow_client

        if not mirror_enabled():
            return
        self.wait_for(
            "the relay to mirror the jobs and versions into MLflow",
            lambda: (
                None
                if OutboxEvent.objects.filter(kind=OutboxKind.MLFLOW, sent_at=None, parked_at=None).exists()
                else True
            ),
        )
        parked = OutboxEvent.objects.filter(kind=OutboxKind.MLFLOW, parked_at__isnull=False).count()
        if parked:
            self.progress.step(f"  {parked} MLflow row(s) could not be mirrored; why: {self.paths.logs / 'relay.log'}")
        client = mlflow_client()
        experiment = client.get_experiment_by_name(settings.FEDNESTED_MLFLOW_EXPERIMENT)
        runs = client.search_runs([experiment.experiment_id]) if experiment is not None else []
        versions = client.search_model_versions()
        self.progress.step(
            f"MLflow holds {len(runs)} job runs ({', '.join(sorted(run.info.run_name for run in runs))}) and "
            f"{len(versions)} registered model versions in {settings.FEDNESTED_MLFLOW_TRACKING_URI} "
            "(browse: mlflow ui --backend-store-uri <that URI>, from scripts/venv.sh mlflow)"
        )

    def summary(self, cast: Cast) -> None:
        trained = [device.domain for device in self.devices]
        scores = [
            VersionScores(
                version_id=version.version_id,
                parent_id=version.parent.version_id if version.parent else None,
                loss_by_domain=domain_losses(version),
            )
            for version in self.versions
        ]
        self.progress.block(
            "Per-domain held-out loss of each version (change against its parent; * = a device trained there):\n\n"
            + loss_table(scores, trained_domains=trained)
        )
        applied = self.applied_updates()
        stale = [row for row in applied if row.staleness > 0]
        self.progress.block(
            "How each candidate was built (τ: promotions its base was behind the champion it was applied to; weight: "
            "its mean normalised weight over the experts it carried, staleness (1+τ)^-0.5 and reliability "
            "included):\n\n"
            + staleness_table(applied)
            + "\n\n"
            + (
                "Stale updates applied with their staleness weight: "
                + ", ".join(
                    f"{row.client_id} on {row.base_version} into {row.candidate} (τ={row.staleness})" for row in stale
                )
                if stale
                else "No stale update was applied."
            )
            + self.waiting_note()
        )
        if self.gate_outcomes and self.options.protected_domains:
            self.progress.block(
                f"Promotion gate (untrained domains {', '.join(self.options.protected_domains)} may get at most "
                f"{self.options.gate_max_increase} nats worse than the parent or the champion; the rounds asked the "
                f"devices for EWC with λ={self.options.ewc_lambda}):\n\n" + gate_table(self.gate_outcomes)
            )
        self.progress.block(
            f"Sign in at {self.url}/ to look around:\n"
            f"  governance officer  olivia / {cast.officer_password}\n"
            f"  ML engineer         eric   / {cast.engineer_password}\n"
            f"REST API: {self.url}/api/v1/docs/   Django admin: {self.url}/admin/\n"
            f"Everything lives in {self.paths.root} (logs in {self.paths.logs})."
        )

    def applied_updates(self) -> list[AppliedUpdate]:
        rows = []
        for version in self.versions:
            window = Round.objects.filter(candidate=version).first()
            if window is None:
                continue
            report = window.record.get("report", {}).get("experts", {})
            for update in Update.objects.filter(applied_in=version).select_related("device", "base_version"):
                shares = [
                    entry["weights"][update.update_id]
                    for entry in report.values()
                    if update.update_id in entry["weights"]
                ]
                rows.append(
                    AppliedUpdate(
                        candidate=version.version_id,
                        parent=version.parent.version_id if version.parent else "-",
                        client_id=update.device.client_id,
                        base_version=update.base_version.version_id,
                        staleness=update.staleness or 0,
                        weight=sum(shares) / len(shares) if shares else 0.0,
                    )
                )
        return rows

    def waiting_note(self) -> str:
        waiting = Update.objects.filter(status=UpdateStatus.BUFFERED).select_related("device", "base_version", "round")
        if not waiting:
            return ""
        listing = ", ".join(
            f"{update.device.client_id} on {update.base_version.version_id}"
            f" ({'window ' + update.round.round_id if update.round else 'no window yet'})"
            for update in waiting
        )
        return f"\nStill buffered for the next aggregation (nothing is lost): {listing}."

    # -- the whole run -----------------------------------------------------------------------------------------------

    def run(self) -> None:
        # SIGTERM (a service manager, `kill`, CI) stops the demo exactly as Ctrl-C does: through the KeyboardInterrupt
        # path below, which stops every child process.
        signal.signal(signal.SIGTERM, interrupt_on_sigterm)
        try:
            cast = self.prepare_database()
            base = self.bootstrap(cast)
            self.prepare_devices(cast)
            self.start_control_plane()
            self.open_window(base, cast)
            self.start_clients()
            for number in range(1, self.options.rounds + 1):
                version = self.candidate(number)
                if number == 1:
                    self.start_late_client(version)
                request = self.approval_request(version)
                if number == 1:
                    self.late_updates_waiting(version)
                if not self.decide(request, cast):
                    break
                self.devices_on(version)
            self.finish_clients()
            self.signals_caught_up()
            self.mlflow_caught_up()
            self.summary(cast)
            if self.options.serve:
                self.progress.step("Serving until Ctrl-C or SIGTERM (the workers and the relay keep running too)")
                while True:
                    self.check_processes()
                    time.sleep(1.0)
        except KeyboardInterrupt:
            self.progress.step("Interrupted: stopping")
        finally:
            for process in [*self.clients.values(), *reversed(self.processes)]:
                process.stop()
