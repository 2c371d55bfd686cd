"""DataHub lineage of the registry, as metadata change proposals built with acryl-datahub's own classes.

The modelling follows what DataHub documents for ML lineage (and what its own MLflow source emits): a model family
is an MLModelGroup, each registered version an MLModel in it, each training job (an aggregation, a core update, an
evaluation) a DataProcessInstance of subtype "ML Training Run" whose inputs are datasets (the version's training
datasets and, for an aggregation, every edge update it applied, one dataset each) and the parent model, and whose
outputs are the versions it produced; the MLModel names its training runs (`trainingJobs`) and the runs that
evaluated it (`downstreamJobs`). So DataHub shows dataset → training run → model version.

Only references and facts about them travel: ids, digests, counts, statuses and each update's device domain as a
dataset property. Never training data, an update's tensors or any free text a person or device wrote (rejection
messages, reasons, errors). The facts are plain dataclasses, so the builders here need no Django and are tested
on their own; apps/governance/datahub.py reads the database into them and delivers what these return.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from datahub.emitter.mce_builder import (
    datahub_guid,
    make_data_platform_urn,
    make_data_process_instance_urn,
    make_dataset_urn,
    make_ml_model_group_urn,
    make_ml_model_urn,
    make_user_urn,
)
from datahub.emitter.mcp import MetadataChangeProposalWrapper
from datahub.metadata.schema_classes import (
    AuditStampClass,
    DataPlatformInstanceClass,
    DataProcessInstanceInputClass,
    DataProcessInstanceOutputClass,
    DataProcessInstancePropertiesClass,
    DataProcessInstanceRunEventClass,
    DataProcessInstanceRunResultClass,
    DataProcessRunStatusClass,
    DatasetPropertiesClass,
    EdgeClass,
    MLHyperParamClass,
    MLMetricClass,
    MLModelGroupPropertiesClass,
    MLModelPropertiesClass,
    MLTrainingRunPropertiesClass,
    RunResultTypeClass,
    SubTypesClass,
    TimeStampClass,
    VersionTagClass,
)

# The platform every entity is on: the control plane's own registry (DataHub accepts a platform it does not know).
PLATFORM = "fednested"
# DataHub's subtype for a training run (datahub.ingestion.source.common.subtypes.MLAssetSubTypes, which its MLflow
# and Vertex sources use); restated as a string because that module pulls in the ingestion framework.
TRAINING_RUN_SUBTYPE = "ML Training Run"
TRAINING_DATASET_SUBTYPE = "Training Dataset"
EDGE_UPDATE_SUBTYPE = "Edge Update"
# Longest property value sent: a param or a reference longer than this is cut (marked with "…"), so one odd value
# cannot make a proposal that DataHub refuses for its size.
MAX_VALUE_CHARS = 500
# Names that can stand in a URN as they are; anything else (a comma or a parenthesis would end a URN's tuple) is
# replaced by a digest of it, and the original stays readable in the entity's properties.
URN_SAFE = re.compile(r"^[A-Za-z0-9._\-/:]{1,200}$")


@dataclass(frozen=True)
class DatasetFacts:
    """A dataset the lineage names: a training dataset of a version, or one edge update (kind "update").

    `properties` are references and counts only (for an update: its device's domain, the device, examples, payload
    digest and size, base version, staleness, status), never data.
    """

    name: str
    kind: str
    properties: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RunFacts:
    """One training run: a Tier-1 job, or a run named in a version's lineage that no job of ours ran (the bootstrap)."""

    ref: str
    kind: str
    created_ms: int
    actor: str
    status: str = ""
    finished_ms: int | None = None
    succeeded: bool | None = None
    # (name, kind) of each input dataset, as in DatasetFacts; (family, version id) of each input and output model.
    inputs_datasets: Sequence[tuple[str, str]] = ()
    inputs_models: Sequence[tuple[str, str]] = ()
    outputs_models: Sequence[tuple[str, str]] = ()
    params: Mapping[str, object] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    properties: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelFacts:
    """One registered version (an MLModel of its family's MLModelGroup)."""

    family: str
    version_id: str
    created_ms: int
    status: str
    parent: str | None
    manifest_sha256: str
    aliases: Sequence[str] = ()
    training_runs: Sequence[str] = ()
    evaluation_runs: Sequence[str] = ()


def cut(value: object) -> str:
    """`value` as a string of at most MAX_VALUE_CHARS."""
    text = str(value)
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 1] + "…"


def urn_name(name: str) -> str:
    """`name` if it can stand in a URN as it is, else a stable digest of it."""
    return name if URN_SAFE.match(name) else f"sha-{datahub_guid({'name': name})}"


def dataset_urn(name: str, kind: str, env: str) -> str:
    """The dataset URN of a training dataset ("datasets.<name>") or an edge update ("updates.<update id>")."""
    prefix = "updates" if kind == "update" else "datasets"
    return make_dataset_urn(PLATFORM, f"{prefix}.{urn_name(name)}", env)


def model_group_urn(family: str, env: str) -> str:
    return make_ml_model_group_urn(PLATFORM, urn_name(family), env)


def model_urn(family: str, version_id: str, env: str) -> str:
    """A version's MLModel URN: "<family>.<version id>" (the way DataHub's MLflow source names a model version)."""
    return make_ml_model_urn(PLATFORM, f"{urn_name(family)}.{urn_name(version_id)}", env)


def run_urn(ref: str) -> str:
    return make_data_process_instance_urn(urn_name(ref))


def _platform() -> DataPlatformInstanceClass:
    return DataPlatformInstanceClass(platform=make_data_platform_urn(PLATFORM))


def dataset_proposals(dataset: DatasetFacts, *, env: str) -> list[MetadataChangeProposalWrapper]:
    """DatasetProperties (name, references as customProperties), its subtype and platform."""
    urn = dataset_urn(dataset.name, dataset.kind, env)
    subtype = EDGE_UPDATE_SUBTYPE if dataset.kind == "update" else TRAINING_DATASET_SUBTYPE
    properties = DatasetPropertiesClass(
        name=cut(dataset.name),
        qualifiedName=cut(f"{'updates' if dataset.kind == 'update' else 'datasets'}.{dataset.name}"),
        customProperties={key: cut(value) for key, value in sorted(dataset.properties.items())},
    )
    return [
        MetadataChangeProposalWrapper(entityUrn=urn, aspect=properties),
        MetadataChangeProposalWrapper(entityUrn=urn, aspect=SubTypesClass(typeNames=[subtype])),
        MetadataChangeProposalWrapper(entityUrn=urn, aspect=_platform()),
    ]


def run_proposals(run: RunFacts, *, env: str) -> list[MetadataChangeProposalWrapper]:
    """A run's DataProcessInstance: properties, subtype, inputs (datasets, parent models), outputs (models), its
    params and metrics as MLTrainingRunProperties, and, once it finished, its run event with the result."""
    urn = run_urn(run.ref)
    custom = {"kind": run.kind, **({"status": run.status} if run.status else {}), **run.properties}
    proposals = [
        MetadataChangeProposalWrapper(
            entityUrn=urn,
            aspect=DataProcessInstancePropertiesClass(
                name=cut(run.ref),
                created=AuditStampClass(time=run.created_ms, actor=make_user_urn(urn_name(run.actor))),
                customProperties={key: cut(value) for key, value in sorted(custom.items())},
            ),
        ),
        MetadataChangeProposalWrapper(entityUrn=urn, aspect=SubTypesClass(typeNames=[TRAINING_RUN_SUBTYPE])),
        MetadataChangeProposalWrapper(entityUrn=urn, aspect=_platform()),
        MetadataChangeProposalWrapper(
            entityUrn=urn,
            aspect=DataProcessInstanceInputClass(
                inputs=[],
                inputEdges=[
                    *(EdgeClass(destinationUrn=dataset_urn(name, kind, env)) for name, kind in run.inputs_datasets),
                    *(EdgeClass(destinationUrn=model_urn(family, vid, env)) for family, vid in run.inputs_models),
                ],
            ),
        ),
        MetadataChangeProposalWrapper(
            entityUrn=urn,
            aspect=DataProcessInstanceOutputClass(
                outputs=[],
                outputEdges=[
                    EdgeClass(destinationUrn=model_urn(family, vid, env)) for family, vid in run.outputs_models
                ],
            ),
        ),
        MetadataChangeProposalWrapper(
            entityUrn=urn,
            aspect=MLTrainingRunPropertiesClass(
                id=cut(run.ref),
                hyperParams=[MLHyperParamClass(name=cut(k), value=cut(v)) for k, v in sorted(run.params.items())],
                trainingMetrics=[MLMetricClass(name=cut(k), value=repr(v)) for k, v in sorted(run.metrics.items())],
            ),
        ),
    ]
    if run.finished_ms is not None and run.succeeded is not None:
        proposals.append(
            MetadataChangeProposalWrapper(
                entityUrn=urn,
                aspect=DataProcessInstanceRunEventClass(
                    timestampMillis=run.finished_ms,
                    status=DataProcessRunStatusClass.COMPLETE,
                    result=DataProcessInstanceRunResultClass(
                        type=RunResultTypeClass.SUCCESS if run.succeeded else RunResultTypeClass.FAILURE,
                        nativeResultType=cut(run.status or "finished"),
                    ),
                    durationMillis=max(0, run.finished_ms - run.created_ms),
                ),
            )
        )
    return proposals


def model_proposals(model: ModelFacts, *, env: str) -> list[MetadataChangeProposalWrapper]:
    """The family's MLModelGroupProperties and the version's MLModelProperties (status, parent, digest, aliases as
    customProperties; its training and evaluation runs; its group)."""
    group = model_group_urn(model.family, env)
    urn = model_urn(model.family, model.version_id, env)
    custom = {
        "status": model.status,
        "manifest_sha256": model.manifest_sha256,
        "aliases": ",".join(sorted(model.aliases)),
        **({"parent": model.parent} if model.parent else {}),
    }
    return [
        MetadataChangeProposalWrapper(
            entityUrn=group, aspect=MLModelGroupPropertiesClass(name=cut(model.family), customProperties={})
        ),
        MetadataChangeProposalWrapper(entityUrn=group, aspect=_platform()),
        MetadataChangeProposalWrapper(
            entityUrn=urn,
            aspect=MLModelPropertiesClass(
                name=cut(model.version_id),
                created=TimeStampClass(time=model.created_ms),
                version=VersionTagClass(versionTag=cut(model.version_id)),
                customProperties={key: cut(value) for key, value in sorted(custom.items())},
                trainingJobs=[run_urn(ref) for ref in model.training_runs],
                downstreamJobs=[run_urn(ref) for ref in model.evaluation_runs],
                groups=[group],
                tags=[cut(f"status:{model.status}"), *(cut(f"alias:{alias}") for alias in sorted(model.aliases))],
            ),
        ),
        MetadataChangeProposalWrapper(entityUrn=urn, aspect=_platform()),
    ]


def lineage_proposals(
    *,
    models: Sequence[ModelFacts] = (),
    runs: Sequence[RunFacts] = (),
    datasets: Sequence[DatasetFacts] = (),
    env: str,
) -> list[MetadataChangeProposalWrapper]:
    """Every proposal for these entities, datasets first then runs then models (the order lineage is read in), each
    entity once (the first facts given for a URN win)."""
    proposals: list[MetadataChangeProposalWrapper] = []
    seen: set[tuple[str, str]] = set()
    for batch in (
        *(dataset_proposals(d, env=env) for d in datasets),
        *(run_proposals(r, env=env) for r in runs),
        *(model_proposals(m, env=env) for m in models),
    ):
        for proposal in batch:
            key = (str(proposal.entityUrn), str(proposal.aspectName))
            if key not in seen:
                seen.add(key)
                proposals.append(proposal)
    return proposals
