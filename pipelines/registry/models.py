"""Models as every verb receives them: a registry URI, a run URI or a training checkpoint → a generator with
the preprocessing it was trained with.

MODEL_URI is anything a user has in hand: `models:/NAME/VERSION`, `models:/NAME@ALIAS`, `models:/NAME/latest`,
`runs:/ID/generator`, or a training checkpoint (`checkpoint.pt`, or the Ray checkpoint folder holding it;
local or s3://).

`LoadedModel.translate` runs the generator the way `p2p translate` and `p2p evaluate` do: at whatever size
the prepared inputs have (the model's crop, or with `resolution: native` the images' own size), padded to
the sizes the generator takes and tiled above `tile_size` (`pix2pix.inference.translate_native`).
`LoadedModel.with_norm_stats("per_image")` runs it with the paper's test-time batch norm instead of eval
mode's running averages (`pix2pix.inference.with_per_image_norm`).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipelines import storage
from pipelines.config import ConfigError
from pipelines.manifest import Manifest
from pipelines.preprocessing import Preprocessing
from pipelines.registry import tracking
from pix2pix.inference import DEFAULT_TILE_OVERLAP, tile_size_for, translate_native, with_per_image_norm
from pix2pix.networks import size_factor as generator_size_factor

GENERATOR_FILE = "p2p_generator.pt"  # extra file of every logged model: config + generator tensors
TILE_SIZE_HELP = (
    "0: each image in one generator call; N: translate images larger than N px in overlapping N×N tiles "
    "blended without seams (N rounded down to the generator's size factor; bounds memory)"
)
TILE_OVERLAP_HELP = (
    "pixels shared by neighbouring tiles, cross-faded (at least; origins keep the U-Net's grid)"
)
NORM_STATS_HELP = (
    "batch-norm statistics: running (eval mode: averages from training) or per_image (each image by its "
    "own statistics, as the authors' test.py without --eval, but with dropout off, which that test.py "
    "keeps on; only `p2p translate --keep-dropout` samples dropout; tagged p2p.norm_stats)"
)
NORM_STATS = ("running", "per_image")


@dataclass
class LoadedModel:
    generator: Any  # callable N×C×H×W → N×C×H×W in [-1, 1], eval mode
    preprocessing: Preprocessing  # recorded at training time
    uri: str
    name: str | None = None  # registry name and version, when the URI points into the registry
    version: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    size_factor: int = 1  # input sides must divide by this (pix2pix.networks.size_factor of its config)
    norm_stats: str = "running"  # batch-norm statistics the generator runs with (NORM_STATS_HELP)

    def with_norm_stats(self, norm_stats: str) -> LoadedModel:
        """This model with its batch norm using `norm_stats` (a copy; a model without batch norm is the
        same function either way)."""
        if norm_stats == self.norm_stats:
            return self
        if norm_stats != "per_image" or not isinstance(self.generator, torch.nn.Module):
            raise ConfigError(f"{self.uri}: cannot switch batch-norm statistics to {norm_stats!r}")
        generator = with_per_image_norm(self.generator).eval()
        return dataclasses.replace(self, generator=generator, norm_stats=norm_stats)

    def check_tiling(self, tile_size: int, tile_overlap: int) -> str:
        """ConfigError when this generator cannot be tiled so (a tile below its size factor, or an overlap
        that leaves no step); else a note to print ("" if none): instance norm differs per tile."""
        try:
            tile_size_for(tile_size, tile_overlap, self.size_factor)
        except ValueError as exc:
            raise ConfigError(f"{self.uri}: {exc}") from None
        if not isinstance(self.generator, torch.nn.Module):
            return ""
        if tile_size and any(isinstance(m, torch.nn.InstanceNorm2d) for m in self.generator.modules()):
            return (
                "note: this generator normalises each tile with its own statistics (instance norm, or "
                "per_image norm_stats): tiles may differ in tone (larger tiles, or tile_size 0, avoid it)"
            )
        return ""

    def translate(
        self,
        images: Any,
        tile_size: int = 0,
        tile_overlap: int = DEFAULT_TILE_OVERLAP,
        tiles_per_call: int = 0,
    ) -> Any:
        """G(images) at the images' own size, N×C×H×W in [-1, 1] on the generator's device: padded to
        `size_factor`, tiled above `tile_size`, cropped back; exactly `generator(images)` when the size is
        already valid and no tiling applies (`pix2pix.inference.translate_native`)."""
        return translate_native(
            self.generator, images, self.size_factor, tile_size, tile_overlap, tiles_per_call
        )


def check_inference_options(
    resolution: str, tile_size: int, tile_overlap: int, norm_stats: str = "running"
) -> None:
    """The model-independent checks of the resolution, tiling and norm options (ConfigError, one line)."""
    if resolution not in ("model", "native"):
        raise ConfigError(f"resolution must be model or native, got {resolution!r}")
    if norm_stats not in NORM_STATS:
        raise ConfigError(f"norm_stats must be {' or '.join(NORM_STATS)}, got {norm_stats!r}")
    if tile_size < 0:
        raise ConfigError(f"tile_size must be >= 0 (0: no tiling), got {tile_size}")
    if tile_overlap < 0 or (tile_size and tile_overlap >= tile_size):
        raise ConfigError(
            f"tile_overlap must be >= 0 and smaller than tile_size ({tile_size}), got {tile_overlap}"
        )


LOGGED_MODEL_ID = re.compile(r"m-[0-9a-f]{32}")


def resolve_registry(uri: str, client: Any) -> tuple[str | None, str | None]:
    """(name, version) for models:/NAME/VERSION and models:/NAME@ALIAS; (None, None) otherwise."""
    if not uri.startswith("models:/"):
        return None, None
    target = uri.removeprefix("models:/").rstrip("/")
    if "@" in target:
        name, alias = target.split("@", 1)
        return name, str(client.get_model_version_by_alias(name, alias).version)
    name, _, version = target.partition("/")
    if not version and LOGGED_MODEL_ID.fullmatch(name) and not client.search_model_versions(f"name='{name}'"):
        return None, None  # MLflow 3's id of a logged (not registered) model, as `p2p train` prints it
    if version in ("", "latest"):
        versions = client.search_model_versions(f"name='{name}'")
        if not versions:
            raise ValueError(f"registered model {name!r} has no versions")
        version = str(max(int(v.version) for v in versions))
    return name, version


RUN_RECORD = "p2p_run.json"  # in a `p2p train` run folder
MODEL_URI_FORMS = (
    "models:/NAME/VERSION, models:/NAME@ALIAS, runs:/RUN_ID/generator, or a checkpoint (a .pt file, or a run "
    "folder holding checkpoint.pt, local or s3://)"
)
# Registered model names go into models:/NAME@ALIAS URIs and into quoted search filters.
MODEL_NAME_REFUSED = ("/", ":", "@", "'", '"', "\\")


def check_model_uri(uri: str) -> None:
    """A one-line refusal, naming the valid forms, of a model URI whose scheme is mistyped (`model:/x/1`,
    `models:x/1`) or a run URI without its artifact path: else it reads as a folder named so, or fails in
    MLflow's artifact download with a message about something else."""
    scheme = re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", uri)
    if scheme and not uri.startswith(("models:/", "runs:/", "s3://", "file://")):
        raise ConfigError(f"model URI {uri!r}: use {MODEL_URI_FORMS}")
    if uri.startswith("runs:/") and "/" not in uri.removeprefix("runs:/").strip("/"):
        raise ConfigError(f"model URI {uri!r} names a run, not its model: use {uri.rstrip('/')}/generator")


def check_model_name(name: str, option: str) -> None:
    """A registered model name MLflow and p2p can use: refused before any training, not at its end."""
    refused = [c for c in MODEL_NAME_REFUSED if c in name]
    if refused or name != name.strip():
        shown = " ".join(refused) or "leading or trailing spaces"
        raise ConfigError(f"{option} {name!r}: a registered model name cannot hold {shown}")


def load_model(uri: str, tracking_uri: str | None = None, device: str = "cpu") -> LoadedModel:
    """The generator behind `uri`, built by this project's code from the recorded config and weights.

    Registry and run models are read as two files of the logged MLflow model: `MLmodel` (YAML, for the
    recorded preprocessing) and the generator weights file (tensors only, `weights_only` loading). The
    model's `code/` folder and its pickled or exported graph are never loaded, so a model in a shared
    registry cannot run code in `p2p evaluate`, `promote` or `translate`.
    """
    check_model_uri(uri)
    if uri.startswith(("models:/", "runs:/")):
        return load_logged_model(uri, tracking_uri, device)
    from pix2pix import load_checkpoint
    from pix2pix.inference import load_generator

    path = uri if uri.endswith(".pt") else storage.join(uri, "checkpoint.pt")
    if not uri.endswith(".pt") and not storage.exists(path) and storage.exists(storage.join(uri, RUN_RECORD)):
        path, data = newest_checkpoint_file(uri)
    else:
        data = storage.read_bytes(path)
    try:
        state = load_checkpoint(data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    recorded = state.get("extra", {}).get("preprocessing")
    if not recorded:
        raise ValueError(
            f"{path} has no recorded preprocessing: evaluate a checkpoint written by `p2p train`"
        )
    generator, config = load_generator(data, device=device)
    prep = Preprocessing.from_dict(recorded)
    info = {"step": state["step"], "epoch": state["epoch"]}
    return LoadedModel(generator, prep, uri, info=info, size_factor=generator_size_factor(config))


def newest_checkpoint_file(run_folder: str) -> tuple[str, bytes]:
    """A `p2p train` run folder given as the model: its newest complete checkpoint and its bytes (Ray Train
    names their folders by time; a file cut short by a crash is passed over), said on the console."""
    from pix2pix import load_checkpoint

    found = [u for u in storage.list_files(run_folder) if u.endswith("/checkpoint.pt")]
    for uri in sorted(found, reverse=True):
        try:
            data = storage.read_bytes(uri)
            load_checkpoint(data)
        except (OSError, ValueError, storage.StorageError):
            continue
        print(f"[p2p] {run_folder} is a training run: its newest checkpoint is {uri}", flush=True)
        return uri, data
    raise FileNotFoundError(f"{run_folder} is a training run without a complete checkpoint yet")


def load_logged_model(uri: str, tracking_uri: str | None, device: str) -> LoadedModel:
    import mlflow.artifacts
    import yaml

    from pix2pix.inference import load_generator

    tracking_uri = tracking.tracking_uri(tracking_uri)
    tracking.check_store_exists(tracking_uri)
    client = tracking.client(tracking_uri)
    name, version = resolve_registry(uri, client)
    if name:
        base = client.get_model_version_download_uri(name, version)
    elif uri.startswith("models:/"):  # a logged model's id: its own artifact location
        base = client.get_logged_model(uri.removeprefix("models:/").rstrip("/")).artifact_location
    else:
        base = uri.rstrip("/")

    def fetch(relative: str) -> str:
        return str(
            mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/{relative}", tracking_uri=tracking_uri)
        )

    mlmodel = yaml.safe_load(Path(fetch("MLmodel")).read_text()) or {}
    recorded = (mlmodel.get("metadata") or {}).get("p2p")
    if not recorded:
        raise ValueError(f"{uri} was not logged by `p2p train`: it has no recorded preprocessing")
    try:
        weights = fetch(f"extra_files/{GENERATOR_FILE}")
    except Exception as exc:  # MLflow raises its own exception types per artifact store
        raise ValueError(
            f"{uri} has no {GENERATOR_FILE} (logged by an older p2p train?): p2p loads generators from their "
            "weights only and never runs a registry model's code; retrain or re-register it"
        ) from exc
    generator, config = load_generator(weights, device=device)
    info = {"run_id": mlmodel.get("run_id")}
    prep = Preprocessing.from_dict(recorded)
    return LoadedModel(generator, prep, uri, name, version, info, generator_size_factor(config))


def log_generator(
    generator: Any,
    config: Any,
    preprocessing: Preprocessing,
    run_id: str,
    tracking_uri: str,
    register_as: str = "",
) -> Any:
    """Log the generator as an MLflow pytorch model of run `run_id` (signature, input example, recorded
    preprocessing as metadata, the weights file `load_model` reads), registered as a new version of
    `register_as` if given. Returns MLflow's ModelInfo."""
    import shutil
    import tempfile

    import mlflow
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    import pix2pix
    from pix2pix.inference import save_generator

    size = preprocessing.crop_size
    example = (
        np.random.default_rng(0).uniform(-1, 1, (2, preprocessing.input_nc, size, size)).astype(np.float32)
    )
    with torch.no_grad():
        output = generator(torch.from_numpy(example)).numpy()
    mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id):
        weights = Path(tmp) / GENERATOR_FILE
        save_generator(weights, generator, config)
        # The library's sources only: the package folder may also hold caches (a linter's, __pycache__).
        code = Path(tmp) / "code" / "pix2pix"
        code.mkdir(parents=True)
        for source in Path(pix2pix.__file__).parent.glob("*.py"):
            shutil.copy2(source, code / source.name)
        return mlflow.pytorch.log_model(
            generator,
            name="generator",
            signature=infer_signature(example, output),
            input_example=example,
            registered_model_name=register_as or None,
            # For MLflow-native serving (mlflow.pytorch.load_model); p2p itself reads only the weights file.
            code_paths=[str(code)],
            extra_files=[str(weights)],
            # Stated, not inferred: inference runs a subprocess that takes ~12 s and adds nothing here.
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"],
            metadata={"p2p": preprocessing.to_dict()},
        )


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
