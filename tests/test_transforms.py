import numpy as np
import pytest
import torch
from PIL import Image

from facegender.config import TrainConfig
from facegender.images import load_face
from facegender.transforms import augment_batch, eval_batch, reference_eval_transform, to_float


def _batch(n=256, seed=0):
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))


def test_eval_batch_equals_the_reference_eval_transform(tmp_path):
    """Both pipelines see the same tensor for the same file: preprocessing is defined once."""
    rng = np.random.default_rng(1)
    path = tmp_path / "face.png"
    Image.fromarray(rng.integers(0, 256, (200, 170, 3), dtype=np.uint8)).save(path)
    fast = eval_batch(torch.from_numpy(load_face(path, size=128))[None])
    reference = reference_eval_transform(TrainConfig())(Image.open(path).convert("RGB"))[None]
    assert fast.shape == reference.shape == (1, 3, 128, 128)
    assert fast.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=0)


def test_flip_is_drawn_per_image_with_probability_one_half():
    config = TrainConfig(rotation=0, brightness=0, contrast=0)
    x = to_float(_batch(2000))
    out = augment_batch(x, config, torch.Generator().manual_seed(0))
    flipped = torch.isclose(out, x.flip(-1)).flatten(1).all(1)
    kept = torch.isclose(out, x).flatten(1).all(1)
    assert bool((flipped | kept).all())
    assert 0.45 < flipped.float().mean().item() < 0.55


def test_rotation_stays_within_the_configured_angle_and_varies_per_image():
    config = TrainConfig(hflip=0, brightness=0, contrast=0, rotation=10)
    x = torch.zeros(64, 3, 65, 65)
    x[:, :, 32, :] = 1.0  # a horizontal line through the centre: its tilt is the rotation angle
    out = augment_batch(x, config, torch.Generator().manual_seed(0))
    angles = []
    for img in out[:, 0]:
        ys, xs = torch.nonzero(img > 0.5, as_tuple=True)
        slope = np.polyfit(xs.numpy(), ys.numpy(), 1)[0]
        angles.append(np.degrees(np.arctan(slope)))
    angles = np.abs(angles)
    assert angles.max() <= 10.5 and angles.std() > 1.5


def test_brightness_and_contrast_factors_are_per_image_and_bounded():
    config = TrainConfig(hflip=0, rotation=0, brightness=0.2, contrast=0)
    x = torch.full((500, 3, 8, 8), 0.5)
    out = augment_batch(x, config, torch.Generator().manual_seed(0))
    factors = out.mean(dim=(1, 2, 3)) / 0.5
    assert factors.min() >= 0.8 - 1e-6 and factors.max() <= 1.2 + 1e-6
    assert factors.std() > 0.09  # uniform on [0.8, 1.2] has std 0.115; one shared factor would give 0


def test_contrast_keeps_the_mean_gray_level():
    config = TrainConfig(hflip=0, rotation=0, brightness=0, contrast=0.2)
    x = to_float(_batch(16)) * 0.5 + 0.25  # away from 0 and 1 so nothing clips
    out = augment_batch(x, config, torch.Generator().manual_seed(0))
    gray = lambda t: (0.2989 * t[:, 0] + 0.587 * t[:, 1] + 0.114 * t[:, 2]).mean(dim=(1, 2))
    torch.testing.assert_close(gray(out), gray(x), atol=1e-4, rtol=0)
    assert not torch.allclose(out, x)


@pytest.mark.parametrize("seed", [0, 1])
def test_augmentation_is_reproducible_from_the_generator(seed):
    x = to_float(_batch(8))
    a = augment_batch(x, TrainConfig(), torch.Generator().manual_seed(seed))
    b = augment_batch(x, TrainConfig(), torch.Generator().manual_seed(seed))
    assert torch.equal(a, b)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _statistics(batch: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-image figures that each augmentation moves: brightness, contrast, the flip, the rotation's corners."""
    half = batch.shape[-1] // 2
    return {"mean": batch.mean(dim=(1, 2, 3)), "std": batch.std(dim=(1, 2, 3)),
            "left-right": batch[..., :half].mean(dim=(1, 2, 3)) - batch[..., half:].mean(dim=(1, 2, 3)),
            "corner": batch[:, :, :12, :12].mean(dim=(1, 2, 3))}


def _reference_draws(image: Image.Image, config: TrainConfig, n: int) -> dict[str, np.ndarray]:
    from facegender.transforms import reference_train_transform

    torch.manual_seed(0)
    transform = reference_train_transform(config)
    return {k: v.numpy() for k, v in _statistics(torch.stack([transform(image) for _ in range(n)])).items()}


@pytest.mark.parametrize("device", DEVICES)
def test_batched_augmentation_on_the_device_matches_torchvision_in_distribution(device):
    """The fast pipeline (on the CPU or with the cache on a GPU) draws the reference pipeline's distribution."""
    from scipy.stats import ks_2samp
    from skimage.data import astronaut

    from facegender.transforms import train_batch

    image = Image.fromarray(astronaut()).resize((128, 128), Image.BILINEAR)
    n, config = 400, TrainConfig()
    reference = _reference_draws(image, config, n)
    copies = torch.from_numpy(np.array(image)).expand(n, -1, -1, -1).to(device)

    def batched(cfg):
        out = train_batch(copies, cfg, torch.Generator().manual_seed(1))
        assert out.device.type == device
        return {k: v.cpu().numpy() for k, v in _statistics(out.float()).items()}

    fast = batched(config)
    for name in reference:
        assert ks_2samp(reference[name], fast[name]).pvalue > 1e-3, name
    # the comparison can tell distributions apart: twice the brightness range, or no flips, are caught
    assert ks_2samp(reference["mean"], batched(TrainConfig(brightness=0.5))["mean"]).pvalue < 1e-3
    assert ks_2samp(reference["left-right"], batched(TrainConfig(hflip=0))["left-right"]).pvalue < 1e-3
