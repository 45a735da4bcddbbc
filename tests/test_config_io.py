"""Job configs from YAML + overrides: typos are errors, values are typed, the shipped examples load."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.config import ConfigError, load_config
from pipelines.dataset.build import DatasetBuildConfig
from pipelines.training.train import TrainJobConfig

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_overrides_are_typed_and_nested(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("source: {uri: a, layout: photos}\nderive: {builder: canny}\noutput: o")
    cfg = load_config(
        DatasetBuildConfig,
        tmp_path / "c.yaml",
        ["resize.size=128", "derive.canny_low=10", "derive.canny_high=30.5", "source.uri=s3://b/p"],
    )
    assert cfg.resize.size == 128 and cfg.derive.canny_low == 10.0 and cfg.derive.canny_high == 30.5
    assert cfg.source.uri == "s3://b/p" and cfg.source.layout == "photos"


def test_a_typo_names_the_known_options() -> None:
    with pytest.raises(ConfigError, match=r"config.derive: unknown option\(s\) buildr; known: builder"):
        load_config(DatasetBuildConfig, overrides=["derive.buildr=canny"])


def test_wrong_types_and_choices_are_errors() -> None:
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(DatasetBuildConfig, overrides=["resize.size=big"])
    with pytest.raises(ConfigError, match="'sobel' is not one of"):
        load_config(DatasetBuildConfig, overrides=["derive.builder=sobel"])


@pytest.mark.parametrize("name", ["camvid_labels_dataset.yaml", "edges_dataset.yaml"])
def test_dataset_examples_load_and_validate(name: str) -> None:
    load_config(DatasetBuildConfig, EXAMPLES / name).validate()


def test_training_example_loads() -> None:
    cfg = load_config(TrainJobConfig, EXAMPLES / "train_camvid.yaml")
    assert cfg.model.netG == "unet_256" and cfg.global_batch_size % cfg.workers == 0
