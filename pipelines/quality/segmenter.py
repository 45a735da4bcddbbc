"""Segmenters as the registry holds them: `<dataset>-segmenter`, next to the dataset's generators.

A segmenter is logged like a generator (`pipelines.registry.models`): an MLflow pytorch model whose
`MLmodel` metadata (`p2p_segmenter`) records its architecture, the dataset's classes (`ClassMap`) and the
image size it was trained at, plus a tensors-only weights file that p2p loads with `weights_only=True` and
its own code; the model's pickled graph and code are never loaded.

Which segmenter scores a model: an explicit URI, or ("auto") the latest version of `<dataset>-segmenter`
(`<dataset>`: the name of the dataset's folder) trained on this very dataset (its location, the version's
`p2p.dataset` tag) and on the same classes and colours (`ClassMap.fingerprint`). Two datasets in folders of
the same name share the registered name, not their segmenters: one trained on another dataset's photos may
have seen this one's validation images, or none of its kind.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipelines import storage
from pipelines.manifest import dataset_root, read_manifest
from pipelines.quality.labels import ClassMap
from pipelines.registry import tracking

WEIGHTS_FILE = "p2p_segmenter.pt"
METADATA_KEY = "p2p_segmenter"


@dataclass
class LoadedSegmenter:
    network: Any  # N×3×H×W photos in [-1, 1] → N×K×H×W logits, eval mode
    class_map: ClassMap
    crop_size: int  # photos are scored at this size (both generated and real ones)
    uri: str
    version: str | None = None
    dataset_build_id: str = ""  # the build it was trained on ("" if not recorded)


def dataset_name(manifest_location: str) -> str:
    return dataset_root(manifest_location).rstrip("/").rsplit("/", 1)[-1]


def segmenter_name(manifest_location: str) -> str:
    """The registered model name of a dataset's segmenter."""
    return f"{dataset_name(manifest_location)}-segmenter"


DATASET_TAG = "p2p.dataset"  # model version tag: the dataset location the segmenter was trained on


def dataset_location(manifest_location: str) -> str:
    """A dataset's identity for the tag: its folder or prefix, absolute, however it was written."""
    return storage.normalize_uri(dataset_root(manifest_location)).rstrip("/")


def metadata(
    network: Any, class_map: ClassMap, crop_size: int, manifest: str, build_id: str
) -> dict[str, Any]:
    return {
        "config": network.cfg.to_dict(),
        "class_ids": list(class_map.ids),
        "class_names": list(class_map.names),
        "class_colors": [list(c) for c in class_map.colors],
        "classes_fingerprint": class_map.fingerprint(),
        "crop_size": crop_size,
        "manifest": manifest,
        "dataset_build_id": build_id,
    }


def log_segmenter(
    network: Any, meta: dict[str, Any], run_id: str, tracking_uri: str, register_as: str
) -> Any:
    """Log the segmenter as an MLflow model of run `run_id`, registered as a new version of `register_as`."""
    import mlflow
    import numpy as np
    from mlflow.models import infer_signature

    size = int(meta["crop_size"])
    example = np.random.default_rng(0).uniform(-1, 1, (1, 3, size, size)).astype(np.float32)
    network = network.eval()
    with torch.no_grad():
        output = network(torch.from_numpy(example)).numpy()
    mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id):
        weights = Path(tmp) / WEIGHTS_FILE
        torch.save({"config": meta["config"], "state_dict": network.state_dict()}, weights)
        return mlflow.pytorch.log_model(
            network,
            name="segmenter",
            signature=infer_signature(example, output),
            input_example=example,
            extra_files=[str(weights)],
            registered_model_name=register_as or None,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            metadata={METADATA_KEY: meta},
        )


def load_segmenter(uri: str, tracking_uri: str, device: str = "cpu") -> LoadedSegmenter:
    """A registered or logged segmenter, built by p2p's code from its metadata and weights file."""
    import mlflow.artifacts
    import yaml

    from pipelines.registry.models import resolve_registry
    from pix2pix.segmenter import Segmenter, SegmenterConfig

    client = tracking.client(tracking_uri)
    name, version = resolve_registry(uri, client)
    base = client.get_model_version_download_uri(name, version) if name else uri.rstrip("/")

    def fetch(relative: str) -> str:
        return str(
            mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/{relative}", tracking_uri=tracking_uri)
        )

    mlmodel = yaml.safe_load(Path(fetch("MLmodel")).read_text()) or {}
    meta = (mlmodel.get("metadata") or {}).get(METADATA_KEY)
    if not meta:
        raise ValueError(f"{uri} is not a segmenter logged by `p2p segmenter train`")
    state = torch.load(fetch(f"extra_files/{WEIGHTS_FILE}"), map_location=device, weights_only=True)
    network = Segmenter(SegmenterConfig(**state["config"]))
    network.load_state_dict(state["state_dict"])
    class_map = ClassMap(
        tuple(meta["class_ids"]), tuple(meta["class_names"]), tuple(tuple(c) for c in meta["class_colors"])
    )
    return LoadedSegmenter(
        network.to(device).eval(),
        class_map,
        int(meta["crop_size"]),
        uri,
        version,
        str(meta.get("dataset_build_id", "")),
    )


def find_segmenter(
    option: str, manifest_location: str, palette: dict[str, Any] | None, tracking_uri: str
) -> tuple[LoadedSegmenter | None, str]:
    """(the segmenter that scores models on this dataset or None, the one-line reason when None).

    `option`: "none", "auto" (the dataset's registered segmenter, if any) or a model URI (then a segmenter
    trained on other classes is an error, not a skip)."""
    if option == "none":
        return None, "FCN-score skipped: segmenter=none"
    if not palette:
        return None, ""  # not a labels dataset: the FCN-score does not apply, nothing to say
    expected = ClassMap.from_palette(palette)
    auto = option in ("", "auto")
    if auto:
        name = segmenter_name(manifest_location)
        train = f"`p2p segmenter train --manifest {manifest_location}`"
        versions = tracking.client(tracking_uri).search_model_versions(f"name='{name}'")
        if not versions:
            return None, f"FCN-score skipped: no segmenter {name!r} registered; train one with {train}"
        here = dataset_location(manifest_location)
        mine = [int(v.version) for v in versions if v.tags.get(DATASET_TAG) == here]
        if not mine:
            elsewhere = sorted({v.tags.get(DATASET_TAG, "an unrecorded dataset") for v in versions})
            return None, (
                f"FCN-score skipped: segmenter {name!r} was trained on {', '.join(elsewhere)}, not {here}; "
                f"train one for it with {train}"
            )
        option = f"models:/{name}/{max(mine)}"
    segmenter = load_segmenter(option, tracking_uri)
    build_id = read_manifest(manifest_location).build_id
    if auto and segmenter.dataset_build_id and segmenter.dataset_build_id != build_id:
        # A rebuild may move samples between splits (another split salt or fractions): the segmenter
        # would score photos it trained on, and every FCN-score, the real photos' ceiling too, rise.
        return None, (
            f"FCN-score skipped: segmenter {option} was trained on dataset build "
            f"{segmenter.dataset_build_id}, and {manifest_location} is now build {build_id}; train one for "
            f"it with {train}"
        )
    if segmenter.class_map.fingerprint() != expected.fingerprint():
        why = f"segmenter {option} was trained on other classes or colours than {manifest_location}'s palette"
        if auto:
            return None, f"FCN-score skipped: {why}"
        raise ValueError(why)
    return segmenter, ""
