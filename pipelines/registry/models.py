"""Models as every verb receives them: a registry URI, a run URI or a training checkpoint → a generator with
the preprocessing it was trained with.

MODEL_URI is anything a user has in hand: `models:/NAME/VERSION`, `models:/NAME@ALIAS`, `models:/NAME/latest`,
`runs:/ID/generator`, or a training checkpoint (`checkpoint.pt`, or the Ray checkpoint folder holding it;
local or s3://).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipelines import storage
from pipelines.manifest import Manifest
from pipelines.preprocessing import Preprocessing


@dataclass
class LoadedModel:
    generator: Any  # callable N×C×H×W → N×C×H×W in [-1, 1], eval mode
    preprocessing: Preprocessing  # recorded at training time
    uri: str
    name: str | None = None  # registry name and version, when the URI points into the registry
    version: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


def resolve_registry(uri: str, client: Any) -> tuple[str | None, str | None]:
    """(name, version) for models:/NAME/VERSION and models:/NAME@ALIAS; (None, None) otherwise."""
    if not uri.startswith("models:/"):
        return None, None
    target = uri.removeprefix("models:/").rstrip("/")
    if "@" in target:
        name, alias = target.split("@", 1)
        return name, str(client.get_model_version_by_alias(name, alias).version)
    name, _, version = target.partition("/")
    if version in ("", "latest"):
        versions = client.search_model_versions(f"name='{name}'")
        if not versions:
            raise ValueError(f"registered model {name!r} has no versions")
        version = str(max(int(v.version) for v in versions))
    return name, version


def load_model(uri: str, tracking_uri: str | None = None, device: str = "cpu") -> LoadedModel:
    import mlflow
    from mlflow import MlflowClient

    if uri.startswith(("models:/", "runs:/")):
        client = MlflowClient(tracking_uri)
        name, version = resolve_registry(uri, client)
        exact = f"models:/{name}/{version}" if name else uri
        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        info = mlflow.models.get_model_info(exact)
        recorded = (info.metadata or {}).get("p2p")
        if not recorded:
            raise ValueError(f"{uri} was not logged by `p2p train`: it has no recorded preprocessing")
        generator = mlflow.pytorch.load_model(exact, map_location=device)
        prep = Preprocessing.from_dict(recorded)
        return LoadedModel(generator, prep, uri, name, version, {"run_id": info.run_id})
    from pix2pix import load_checkpoint
    from pix2pix.inference import load_generator

    path = uri if uri.endswith(".pt") else storage.join(uri, "checkpoint.pt")
    data = storage.read_bytes(path)
    state = load_checkpoint(data)
    recorded = state.get("extra", {}).get("preprocessing")
    if not recorded:
        raise ValueError(
            f"{path} has no recorded preprocessing: evaluate a checkpoint written by `p2p train`"
        )
    generator, _ = load_generator(data, device=device)
    prep = Preprocessing.from_dict(recorded)
    return LoadedModel(generator, prep, uri, info={"step": state["step"], "epoch": state["epoch"]})


def check_task(model: LoadedModel, manifest: Manifest) -> None:
    """Refuse to score a model on data of another task (channel counts differ in its direction)."""
    prep = model.preprocessing
    expected = manifest.channels(prep.direction)
    if expected != (prep.input_nc, prep.output_nc):
        raise ValueError(
            f"{model.uri} maps {prep.input_nc}→{prep.output_nc} channels "
            f"({prep.direction}) but this dataset gives {expected[0]}→{expected[1]}: "
            "it was trained on a different task"
        )
