"""A robustness set built from labelled 2D images: what other sites' images look like.

``make_variants(pixels, mask)`` turns one 8-bit image and its label map into the variants a
model meets outside its own dataset (issue 23): upscaled to 1024 and 2048 px (other
detectors and no pixel size in PNG), gamma 0.6 and 1.6 (other look-up tables), burned-in
text and markers, a 10 % border crop (10 % of each side removed: another collimation), an
off-centre crop and added noise. Each variant keeps its mask exactly aligned (nearest
neighbour for labels), so Dice on a variant is comparable with Dice on the original.
``benchmarks/robustness.py`` scores a trained model on them; the tests use a few images.
"""

import numpy as np
from PIL import Image, ImageDraw, ImageFont

UPSCALED_SIZES = (1024, 2048)
GAMMAS = (0.6, 1.6)
BORDER_CROP = 0.10          # of each side
OFF_CENTRE_KEEP = 0.80      # of each axis, window pushed to one corner
NOISE_SIGMA = 12.0          # grey levels of 255: a noisy portable radiograph
TEXT_HEIGHT = 0.06          # of the image height: typical burned-in annotation size


def variant_names() -> list:
    return (["original"] + [f"upscaled_{n}" for n in UPSCALED_SIZES] + [f"gamma_{g:g}" for g in GAMMAS]
            + ["text_markers", "border_crop_10", "offcentre_crop", "noise"])


def make_variants(pixels: np.ndarray, mask: np.ndarray, seed: int = 0) -> dict:
    """``{name: (image uint8 (H', W'), mask (H', W'))}`` for every name of :func:`variant_names`."""
    pixels = _as_uint8(pixels)
    mask = np.asarray(mask)
    variants = {"original": (pixels, mask)}
    for size in UPSCALED_SIZES:
        variants[f"upscaled_{size}"] = upscale(pixels, mask, size)
    for gamma in GAMMAS:
        variants[f"gamma_{gamma:g}"] = (apply_gamma(pixels, gamma), mask)
    variants["text_markers"] = (burn_in_text(pixels), mask)
    variants["border_crop_10"] = crop(pixels, mask, BORDER_CROP, BORDER_CROP)
    variants["offcentre_crop"] = crop_corner(pixels, mask, OFF_CENTRE_KEEP)
    variants["noise"] = (add_noise(pixels, NOISE_SIGMA, seed), mask)
    return variants


def _as_uint8(pixels) -> np.ndarray:
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8:
        raise ValueError(f"variants are made from 8-bit images, got {pixels.dtype}")
    if pixels.ndim != 2:
        raise ValueError(f"variants are made from grey 2D images, got shape {pixels.shape}")
    return pixels


def upscale(pixels, mask, longest_side: int) -> tuple:
    """Bicubic image, nearest-neighbour mask, the longest side brought to ``longest_side``."""
    height, width = pixels.shape
    factor = longest_side / max(height, width)
    size = (int(round(width * factor)), int(round(height * factor)))   # PIL: (width, height)
    image = np.asarray(Image.fromarray(pixels).resize(size, Image.BICUBIC))
    labels = np.asarray(Image.fromarray(mask.astype(np.uint8)).resize(size, Image.NEAREST))
    return image, labels.astype(mask.dtype)


def apply_gamma(pixels, gamma: float) -> np.ndarray:
    scaled = (pixels.astype(np.float64) / 255.0) ** gamma
    return np.clip(np.round(scaled * 255.0), 0, 255).astype(np.uint8)


def burn_in_text(pixels) -> np.ndarray:
    """White annotations as on clinical radiographs: side marker, date, site, a ruler block."""
    height, width = pixels.shape
    image = Image.fromarray(pixels.copy())
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(8, int(round(TEXT_HEIGHT * height))))
    margin = max(2, width // 50)
    draw.text((margin, margin), "R", fill=255, font=font)
    draw.text((width // 2, margin), "PA ERECT 2026-12-02", fill=255, font=font)
    draw.text((margin, height - margin - TEXT_HEIGHT * height * 1.3), "ID 0049-2231  ST. ELSEWHERE",
              fill=255, font=font)
    block = max(3, width // 40)
    draw.rectangle([width - margin - block, height // 3, width - margin, height // 3 + 4 * block], fill=255)
    return np.asarray(image)


def crop(pixels, mask, fraction_y: float, fraction_x: float) -> tuple:
    """Remove ``fraction`` of the size from each side."""
    height, width = pixels.shape
    dy, dx = int(round(height * fraction_y)), int(round(width * fraction_x))
    return pixels[dy:height - dy, dx:width - dx], mask[dy:height - dy, dx:width - dx]


def crop_corner(pixels, mask, keep: float) -> tuple:
    """A window of ``keep`` of each axis, pushed to the lower-right corner (patient off-centre)."""
    height, width = pixels.shape
    top, left = height - int(round(height * keep)), width - int(round(width * keep))
    return pixels[top:, left:], mask[top:, left:]


def add_noise(pixels, sigma: float, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0.0, sigma, pixels.shape)
    return np.clip(np.round(pixels + noise), 0, 255).astype(np.uint8)
