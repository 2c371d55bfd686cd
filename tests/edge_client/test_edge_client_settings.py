"""ClientSettings from a tier2 config: the adapter, training and retry sections are the config's own dataclasses,
taken as they are, and settings built directly default like a config file that leaves a setting out."""

from __future__ import annotations

from pathlib import Path

from edge_client.runner import ClientSettings
from fednested.config import EdgeTrainConfig, ExpertLoraConfig, RetryPolicy, load_config

TIER2 = """\
kind: tier2
client_id: edge-0001
control_plane_url: http://127.0.0.1:8000
enrollment_token_file: token
sidecar_policy_path: policy.yaml
data:
  train_files: [train.jsonl]
"""


def test_settings_take_the_config_dataclasses_as_they_are(tmp_path: Path) -> None:
    path = tmp_path / "edge.yaml"
    path.write_text(
        TIER2 + "adapter: {rank: 4, experts: [3, 1]}\n"
        "training: {max_steps: 2, adam_betas: [0.8, 0.99], recompute_experts: true}\n"
        "retry: {max_attempts: 2, jitter: 0}\n"
    )
    config = load_config(path, "tier2")
    settings = ClientSettings.from_config(config)
    assert settings.adapter is config.adapter
    assert settings.training is config.training
    assert settings.retry is config.retry
    assert settings.adapter == ExpertLoraConfig(rank=4, experts=[1, 3])
    assert settings.training == EdgeTrainConfig(max_steps=2, adam_betas=(0.8, 0.99), recompute_experts=True)
    assert settings.retry == RetryPolicy(max_attempts=2, jitter=0.0)


def test_settings_built_directly_default_like_a_config_without_those_settings(tmp_path: Path) -> None:
    path = tmp_path / "edge.yaml"
    path.write_text(TIER2)
    from_file = ClientSettings.from_config(load_config(path, "tier2"))
    direct = ClientSettings(
        client_id=from_file.client_id,
        control_plane_url=from_file.control_plane_url,
        token_file=from_file.token_file,
        state_dir=from_file.state_dir,
        policy_file=from_file.policy_file,
        data_files=from_file.data_files,
        bus=from_file.bus,
        spool_dir=from_file.spool_dir,
        audit_log=from_file.audit_log,
    )
    assert direct == from_file
