"""FID/KID plumbing, FCN-score arithmetic, contact sheets and the promotion rule, without Ray or a registry.

The real FID Inception weights are not available here (nothing may be downloaded), so the plumbing is checked
on a randomly initialised FID InceptionV3 saved with the official file's parameter names: the same images
score FID ≈ 0 and KID ≈ 0, a shifted distribution scores clearly higher, torchmetrics' FID equals the
closed form computed with scipy's sqrtm on the same features, and, where torch-fidelity is installed, our
network gives torch-fidelity's features on the same weights file.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.quality import fid as fid_module
from pipelines.quality.fid import FID_WEIGHTS_ENV, RealismStats, fid_weights_path
from pipelines.quality.labels import IGNORE, ClassMap, confusion, fcn_scores
from pipelines.quality.sheets import contact_sheet
from pipelines.registry.promote import PromoteConfig, passes
from pix2pix.inception import FIDInceptionV3, load_fid_inception

# Parameter names of pytorch-fid's pt_inception-2015-12-05-6726825d.pth (torchvision's Inception3 names).
OFFICIAL_KEYS = (
    "Conv2d_1a_3x3.conv.weight",
    "Conv2d_1a_3x3.bn.running_var",
    "Mixed_5b.branch5x5_2.conv.weight",
    "Mixed_6e.branch7x7dbl_5.bn.bias",
    "Mixed_7c.branch3x3dbl_3b.conv.weight",
    "Mixed_7c.branch_pool.bn.running_mean",
    "fc.weight",
    "fc.bias",
)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random FID Inception state dict, scaled so activations neither vanish nor explode."""
    torch.manual_seed(0)
    network = FIDInceptionV3()
    for module in network.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight)
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    state = network.state_dict()
    assert set(OFFICIAL_KEYS) <= set(state)
    path = tmp_path_factory.mktemp("fid") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(state, path)
    return path


def photos(seed: int, n: int, shift: float = 0.0) -> torch.Tensor:
    """Smooth random 'photos' in [0, 1]: low-frequency colour fields, optionally brightened."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=generator)
    images = torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)
    return (images * 0.7 + shift).clamp(0, 1)


@pytest.fixture(scope="module")
def features(weights: Path) -> dict[str, torch.Tensor]:
    """Inception features of 8 real photos, 8 others from the same distribution and 8 brightened ones
    (computed once: the 299×299 Inception costs about half a second per image on 2 CPU cores)."""
    stats = RealismStats(str(weights))
    stats.update(photos(2, 8), photos(1, 8))  # the path evaluation takes: images in, features kept
    with torch.no_grad():
        shifted = stats.network(photos(2, 8, shift=0.5)).double()
    return {"real": stats.real[0], "other": stats.fake[0], "shifted": shifted}


def realism(weights: Path, fake: torch.Tensor, real: torch.Tensor) -> dict[str, float]:
    stats = RealismStats(str(weights))
    stats.fake, stats.real = [fake], [real]
    return stats.result()


def test_fid_and_kid_plumbing(weights: Path, features: dict[str, torch.Tensor]) -> None:
    real = features["real"]
    same = realism(weights, real, real)
    other_draw = realism(weights, features["other"], real)
    shifted = realism(weights, features["shifted"], real)
    print(f"FID same {same['fid']:.3g} other draw {other_draw['fid']:.3g} shifted {shifted['fid']:.3g}")
    print(f"KID same {same['kid']:.3g} other draw {other_draw['kid']:.3g} shifted {shifted['kid']:.3g}")
    assert abs(same["fid"]) < 1e-4 * shifted["fid"]
    # KID's unbiased estimator of a set against itself is slightly negative, of order 1/N of the spread.
    assert abs(same["kid"]) < 0.01 * shifted["kid"]
    assert shifted["fid"] > 10 * other_draw["fid"] > 0
    assert shifted["kid"] > 10 * max(other_draw["kid"], 0)
    assert realism(weights, features["shifted"], real) == shifted  # seeded: reproducible


def test_kid_std_is_reported_only_when_subsets_differ(
    weights: Path, features: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    """KID's spread comes from its random subsets: a split no larger than the subset size (1,000) makes
    every subset the whole split, and a spread of 0 that would read as certainty."""
    assert "kid_std" not in realism(weights, features["shifted"], features["real"])  # 8 samples
    monkeypatch.setattr(fid_module, "KID_SUBSET_SIZE", 4)
    spread = realism(weights, features["shifted"], features["real"])
    assert spread["kid_std"] > 0


@pytest.mark.parametrize("samples", [8, 40])  # fewer and more samples than feature dimensions
def test_fid_equals_torchmetrics_and_the_closed_form(features: dict[str, torch.Tensor], samples: int) -> None:
    """`frechet_distance` (low-rank form below D samples) against torchmetrics' FrechetInceptionDistance and
    scipy's sqrtm closed form, on the first 24 feature dimensions (the identity holds for any D; at 2048 each
    reference takes tens of seconds)."""
    from scipy import linalg
    from torchmetrics.image.fid import FrechetInceptionDistance

    from pipelines.quality.fid import _Features, frechet_distance

    generator = torch.Generator().manual_seed(samples)
    pool_a = torch.cat([features["other"], features["real"]])[:, :24]
    pool_b = features["shifted"][:, :24]
    a = pool_a[torch.randint(len(pool_a), (samples,), generator=generator)] + 0.01 * torch.randn(
        samples, 24, generator=generator, dtype=torch.float64
    )
    b = pool_b[torch.randint(len(pool_b), (samples,), generator=generator)] + 0.01 * torch.randn(
        samples, 24, generator=generator, dtype=torch.float64
    )
    reference = FrechetInceptionDistance(feature=_Features(24)).set_dtype(torch.float64)
    reference.update(b, real=True)
    reference.update(a, real=False)
    x, y = a.numpy(), b.numpy()
    cov_x, cov_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    closed = ((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(
        cov_x + cov_y - 2 * linalg.sqrtm(cov_x @ cov_y).real
    )
    ours = frechet_distance(a, b)
    assert ours == pytest.approx(float(reference.compute()), rel=1e-4)
    assert ours == pytest.approx(float(closed), rel=1e-4)


def _torch_fidelity_inception() -> type | None:
    """torch-fidelity's InceptionV3 where torch-fidelity is installed. Its package __init__ imports
    torchvision (for other extractors), so the module is loaded without running that __init__."""
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None or not spec.submodule_search_locations:
        return None
    if "torch_fidelity" not in sys.modules:
        package = types.ModuleType("torch_fidelity")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["torch_fidelity"] = package
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    return FeatureExtractorInceptionV3  # type: ignore[no-any-return]


def test_our_inception_matches_torch_fidelity_on_the_same_weights(weights: Path) -> None:
    reference = _torch_fidelity_inception()
    if reference is None:
        pytest.skip("torch-fidelity is not installed (it needs torchvision, which this project does not use)")
    images = torch.randint(0, 256, (2, 3, 48, 40), dtype=torch.uint8)
    expected = reference("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights))(
        images
    )[0]
    with torch.no_grad():
        ours = load_fid_inception(weights)(images.float() / 255)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


def test_weights_are_checked_and_their_absence_explained(
    weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(FID_WEIGHTS_ENV, raising=False)
    path, why = fid_weights_path("")
    assert path is None and FID_WEIGHTS_ENV in why and "pt_inception-2015-12-05-6726825d.pth" in why
    assert "\n" not in why
    monkeypatch.setenv(FID_WEIGHTS_ENV, str(weights))
    assert fid_weights_path("") == (str(weights), "")
    assert fid_weights_path(str(weights)) == (str(weights), "")
    with pytest.raises(FileNotFoundError, match=r"no-such\.pth not found"):  # asked for by name: not skipped
        fid_weights_path(str(tmp_path / "no-such.pth"))
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError, match="not the FID InceptionV3"):
        load_fid_inception(wrong)


def test_label_colours_map_back_to_classes_and_fcn_scores() -> None:
    palette = {
        "classes": [
            {"id": 0, "name": "sky", "color": [128, 128, 128]},
            {"id": 1, "name": "road", "color": [128, 64, 128]},
            {"id": 2, "name": "void", "color": [0, 0, 0]},
        ],
        "ignore_id": 2,
    }
    class_map = ClassMap.from_palette(palette)
    assert class_map.ids == (0, 1) and class_map.names == ("sky", "road")
    rgb = torch.tensor([[128, 128, 128], [128, 64, 128], [0, 0, 0], [1, 2, 3]], dtype=torch.float32)
    label_map = (rgb.T.reshape(1, 3, 1, 4) / 127.5) - 1  # as the loader gives them
    assert class_map.labels(label_map).tolist() == [[[0, 1, IGNORE, IGNORE]]]

    truth = torch.tensor([[0, 0, 0, 1, 1, IGNORE]])
    predicted = torch.tensor([[0, 0, 1, 1, 0, 1]])
    matrix = confusion(predicted, truth, 2)
    assert matrix.tolist() == [[2, 1], [1, 1]]
    scores = fcn_scores(matrix)
    assert scores["pixel_acc"] == pytest.approx(3 / 5)
    assert scores["class_acc"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert scores["iou"] == pytest.approx((2 / 4 + 1 / 3) / 2)


def test_contact_sheet_is_labelled_and_enlarged() -> None:
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    sheet = contact_sheet(images, images, images, ["a", "b", "c"], "model/1 val")
    assert sheet.dtype == np.uint8 and sheet.shape[1] == 3 * 128 and sheet.shape[0] > 3 * 128
    header = sheet[: sheet.shape[0] - 3 * 128]
    assert (header < 128).any()  # text was drawn


@pytest.mark.parametrize("greater", [True, False])
@pytest.mark.parametrize(
    ("absolute", "relative"), [(None, None), (0.05, None), (None, 0.1), (0.05, 0.1), (0.0, None)]
)
def test_promotion_rule_is_mlflows(greater: bool, absolute: float | None, relative: float | None) -> None:
    """`passes` against MLflow's own model-validation function on a grid of candidate/champion pairs."""
    from mlflow.models.evaluation.validation import ModelValidationFailedException, _validate

    cfg = PromoteConfig("m", min_absolute_change=absolute, min_relative_change=relative)
    cfg.validate()
    threshold = cfg.threshold("psnr" if greater else "l1")
    for champion in (-1.0, 0.0, 0.5, 1.0):
        for candidate in (champion - 0.2, champion - 0.05, champion, champion + 0.05, champion + 0.2):
            ours = passes(candidate, champion, threshold, greater)
            if threshold is None:  # no threshold: strictly better, MLflow's zero-baseline fallback
                expected = Decimal(candidate) > Decimal(champion) if greater else candidate < champion
            else:
                try:
                    _validate({"m": threshold}, {"m": candidate}, {"m": champion})
                    expected = True
                except ModelValidationFailedException:
                    expected = False
            assert ours == expected, (candidate, champion, threshold)
