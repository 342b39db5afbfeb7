"""imagededup CNN mode on the speed corpus, end to end, in its own virtualenv (bench/.venv-imagededup).

    bench/.venv-imagededup/bin/python bench/peers/run_imagededup.py CORPUS MANIFEST OUT.json
"""
from __future__ import annotations

import time

import numpy as np

from common import Clock, args, load_manifest, ns_score, pair_scores, write

corpus, manifest, out = args()
rows = load_manifest(manifest)
started = time.perf_counter()
result = {"tool": "imagededup (CNN)"}
try:
    import imagededup
    from imagededup.methods import CNN

    result["version"] = imagededup.__version__
    cnn = CNN(verbose=False)  # MobileNetV3-small; torchvision downloads its weights on first use
except Exception as exc:  # offline: no weights to download; time the same network, untrained
    import torch
    from imagededup.utils import CustomModel
    from imagededup.utils.models import MobilenetV3
    from torchvision import models

    class Untrained(MobilenetV3):
        def __init__(self):
            torch.nn.Module.__init__(self)
            net = models.mobilenet_v3_small(weights=None).eval()
            self.mobilenet_gap_op = torch.nn.Sequential(net.features, net.avgpool)

    result["weights"] = (f"ImageNet weights not available offline ({type(exc).__name__}); the same network "
                         "with random weights: speed only, accuracy figures meaningless")
    result["accuracy_valid"] = False
    cnn = CNN(verbose=False, model_config=CustomModel(model=Untrained(), transform=MobilenetV3.transform,
                                                       name=MobilenetV3.name))
result["import_and_model_seconds"] = time.perf_counter() - started
clock = Clock()
encodings = cnn.encode_images(image_dir=corpus, recursive=True, num_enc_workers=0)
duplicates = cnn.find_duplicates(encoding_map=encodings)  # default min_similarity_threshold 0.9
result["run_seconds"] = clock.lap()
result["images"] = len(rows)
result["images_per_second"] = len(rows) / result["run_seconds"]
result["threshold"] = 0.9
predicted = {(a, b) for a, dups in duplicates.items() for b in dups}
result.update(pair_scores(predicted, rows))
uk = [r for r in rows if r["set"] == "ukbench"]
result["ns_score_ukbench"] = ns_score(np.stack([encodings[r["path"]] for r in uk]), [r["group"] for r in uk])
write(out, result)
print({k: v for k, v in result.items()})
