"""Rotated views from one decode equal a separate pass with ``embed.rotation`` (issue 10)."""
from __future__ import annotations

import dataclasses

import numpy as np

from pipeline.config import Config
from pipeline.encoders import backbones, cnn
from tests.helpers import shared_path


def test_views_in_one_pass_equal_separate_rotated_passes():
    folder = shared_path("data", "holidays-dev")
    contents = [p.read_bytes() for p in sorted(folder.glob("*.jpg"))[:6]] + [b"not an image"]
    key = cnn.model_key(Config.load(None, ["embed.runtime=tensorflow"]))
    model = backbones.load_embedding_model(key)
    per_view, errors = cnn.embed_views(model, contents, 4, 10**8, (0, 90, 270))
    assert errors[-1].startswith("decode failed") and not any(errors[:-1])
    for view, rotation in zip(per_view, (0, 90, 270)):
        separate, _ = cnn.embed_contents(backbones.load_embedding_model(dataclasses.replace(key, rotation=rotation)),
                                         contents, 4, 10**8)
        assert view[-1] is None
        np.testing.assert_allclose(np.stack(view[:-1]), np.stack(separate[:-1]), atol=1e-5)
    # A sideways view is a different descriptor (the test would pass trivially otherwise).
    assert np.min(np.sum(np.stack(per_view[0][:-1]) * np.stack(per_view[1][:-1]), axis=1)) < 0.95


def test_one_side_embeds_quarter_turns_only_of_images_at_least_as_tall_as_wide():
    import io

    from PIL import Image

    folder = shared_path("data", "ukbench-dev")
    wide = (folder / "ukbench00008.jpg").read_bytes()
    with Image.open(io.BytesIO(wide)) as photo:
        buf = io.BytesIO()
        photo.transpose(Image.Transpose.ROTATE_90).save(buf, "JPEG", quality=90)
    tall = buf.getvalue()
    key = cnn.model_key(Config.load(None, ["embed.runtime=tensorflow"]))
    model = backbones.load_embedding_model(key)
    every, _ = cnn.embed_views(model, [wide, tall], 4, 10**8, (0, 90, 180, 270))
    one, errors = cnn.embed_views(model, [wide, tall], 4, 10**8, (0, 90, 180, 270), one_side=True)
    assert errors == [None, None]
    for v, rotation in enumerate((0, 90, 180, 270)):
        assert one[v][1] is not None and np.allclose(one[v][1], every[v][1], atol=1e-5)
        assert (one[v][0] is None) == (rotation in (90, 270))
    # The tall side's turned view is the wide image again: the pair is found from that side.
    assert float(np.dot(one[3][1], every[0][0])) > 0.95
