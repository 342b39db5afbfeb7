"""Photos any installation has (scikit-image ships them), for int8 calibration without user images.

Post-training quantization needs images like the ones the network will see, but not the
collection being searched. Crops of scikit-image's photos (people, animals, objects, a
street scene, textures, microscopy, astronomy, greyscale scans) are such a set: int8
calibrated on them scored as int8 calibrated on a real photo collection (README "Speed").
"""
from __future__ import annotations

import io

import numpy as np

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "stereo_motorcycle", "colorwheel", "camera", "moon", "coins", "clock", "brick", "grass", "gravel",
          "horse", "page")


def _photos() -> list:
    import skimage.data
    from PIL import Image

    out = []
    for name in PHOTOS:
        array = getattr(skimage.data, name)()
        for a in (array[:2] if isinstance(array, tuple) else (array,)):  # stereo pairs: both views
            a = np.asarray(a)
            if a.dtype == bool:
                a = a.astype(np.uint8) * 255
            if a.ndim == 3 and a.shape[2] == 4:
                a = a[..., :3]
            out.append(Image.fromarray(a.astype(np.uint8)).convert("RGB"))
    return out


def calibration_jpegs(count: int, seed: int = 0) -> list[bytes]:
    """``count`` JPEGs: random crops (40-100% of each side) of the photos, half of them mirrored."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    sources = _photos()
    out = []
    for i in range(count):
        image = sources[i % len(sources)]
        w, h = image.size
        cw, ch = (int(s * rng.uniform(0.4, 1.0)) for s in (w, h))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = image.crop((left, top, left + cw, top + ch))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buffer = io.BytesIO()
        crop.save(buffer, format="JPEG", quality=int(rng.integers(70, 95)))
        out.append(buffer.getvalue())
    return out
