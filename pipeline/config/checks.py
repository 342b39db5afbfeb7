"""Checks of settings that span several sections (called by :meth:`pipeline.config.Config.validate`)."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from pipeline.config.parsing import ConfigError

if TYPE_CHECKING:
    from pipeline.config import Config

INPUT_MODES = ("squash", "aspect")
POOLING_METHODS = ("avg", "max", "gem", "rmac")
RUNTIMES = ("auto", "tensorflow", "openvino")
PRECISIONS = ("auto", "fp32", "bf16", "int8")


def validate_descriptor_options(config: "Config") -> None:
    e, d = config.embed, config.dedup
    if e.input not in INPUT_MODES:
        raise ConfigError(f"embed.input must be one of {', '.join(INPUT_MODES)}, got {e.input!r}")
    if not 32 <= e.max_side <= 4096:
        raise ConfigError(f"embed.max_side must be in [32, 4096], got {e.max_side!r}")
    if e.size_multiple < 1 or e.size_multiple > 64:
        raise ConfigError(f"embed.size_multiple must be in [1, 64], got {e.size_multiple!r}")
    if not e.scales or any(not 0.1 <= s <= 4.0 for s in e.scales):
        raise ConfigError(f"embed.scales must be a non-empty list of numbers in [0.1, 4], got {e.scales!r}")
    if e.pooling not in POOLING_METHODS:
        raise ConfigError(f"embed.pooling must be one of {', '.join(POOLING_METHODS)}, got {e.pooling!r}")
    if e.gem_p <= 0:
        raise ConfigError(f"embed.gem_p must be > 0, got {e.gem_p!r}")
    if not 1 <= e.rmac_levels <= 5:
        raise ConfigError(f"embed.rmac_levels must be in [1, 5], got {e.rmac_levels!r}")
    if not 0 < e.power_norm <= 1:
        raise ConfigError(f"embed.power_norm must be in (0, 1], got {e.power_norm!r}")
    if e.runtime not in RUNTIMES:
        raise ConfigError(f"embed.runtime must be one of {', '.join(RUNTIMES)}, got {e.runtime!r}")
    if e.precision not in PRECISIONS:
        raise ConfigError(f"embed.precision must be one of {', '.join(PRECISIONS)}, got {e.precision!r}")
    if e.runtime == "tensorflow" and e.precision not in ("auto", "fp32"):
        raise ConfigError(f"embed.precision {e.precision} needs embed.runtime openvino or auto "
                          "(TensorFlow runs in fp32)")
    if e.calibration_images < 16:
        raise ConfigError(f"embed.calibration_images must be >= 16, got {e.calibration_images!r}")
    if e.precision == "int8":
        # Without folders, int8 calibrates on crops of scikit-image's photos (pipeline.core.sample_photos).
        missing = [p for p in e.calibration_input if not os.path.isdir(p)]
        if missing:
            raise ConfigError(f"embed.calibration_input: not a folder: {missing[0]!r}")
        e.calibration_input = [os.path.abspath(p) for p in e.calibration_input]
    if e.rotation not in (0, 90, 180, 270):
        raise ConfigError(f"embed.rotation must be 0, 90, 180 or 270, got {e.rotation!r}")
    if isinstance(e.postprocess, str) and e.postprocess.strip().lower() in ("", "none", "null"):
        e.postprocess = None
    if d.dba_k < 0 or d.qe_k < 0:
        raise ConfigError(f"dedup.dba_k and dedup.qe_k must be >= 0, got {d.dba_k!r}, {d.qe_k!r}")
    if d.dba_alpha < 0 or d.qe_alpha < 0:
        raise ConfigError("dedup.dba_alpha and dedup.qe_alpha must be >= 0")
    if not d.rotations or any(r not in (0, 90, 180, 270) for r in d.rotations) or 0 not in d.rotations:
        raise ConfigError(f"dedup.rotations must list degrees among 0, 90, 180, 270 and include 0, got {d.rotations!r}")
    t = config.train
    if t.dim is not None and t.dim < 1:
        raise ConfigError(f"train.dim must be >= 1 or null, got {t.dim!r}")
    if t.power < 0 or not 0 <= t.shrinkage <= 1:
        raise ConfigError(f"train.power must be >= 0 and train.shrinkage in [0, 1], got {t.power!r}, {t.shrinkage!r}")
    if t.head_dim < 0 or t.head_epochs < 1 or t.head_temperature <= 0 or t.head_augmentations < 1:
        raise ConfigError("train.head_dim must be >= 0, train.head_epochs and train.head_augmentations >= 1, "
                          f"train.head_temperature > 0; got {t.head_dim!r}, {t.head_epochs!r}, "
                          f"{t.head_augmentations!r}, {t.head_temperature!r}")


PAIR_SCORES = ("calibrated", "cosine")


def validate_pair_score(config: "Config") -> None:
    """dedup.score, dedup.threshold on its scale, dedup.calibration (issue 11)."""
    d = config.dedup
    if d.score not in PAIR_SCORES:
        raise ConfigError(f"dedup.score must be one of {', '.join(PAIR_SCORES)}, got {d.score!r}")
    if d.score == "calibrated" and not 0.0 <= d.threshold <= 1.0:
        raise ConfigError(f"dedup.threshold is an expected pair precision in [0, 1] with dedup.score=calibrated "
                          f"(set dedup.score=cosine to threshold the cosine), got {d.threshold!r}")
    if not -1.0 <= d.threshold <= 1.0:
        raise ConfigError(f"dedup.threshold is a cosine similarity in [-1, 1], got {d.threshold!r}")
    if isinstance(d.calibration, str) and d.calibration.strip().lower() in ("", "none", "null"):
        d.calibration = None
    if d.calibration is not None:
        if not os.path.isfile(d.calibration):
            raise ConfigError(f"dedup.calibration: file not found: {d.calibration!r} (a .npz from make calibrate)")
        d.calibration = os.path.abspath(d.calibration)


KEEP_POLICIES = ("pixels", "largest", "oldest", "newest")
APPLY_MODES = ("report", "move", "hardlink", "symlink")


def validate_review_options(config: "Config") -> None:
    """dedup decisions, report and apply settings (issue 12)."""
    d, r, a = config.dedup, config.report, config.apply
    if d.keep not in KEEP_POLICIES:
        raise ConfigError(f"dedup.keep must be one of {', '.join(KEEP_POLICIES)}, got {d.keep!r}")
    d.keep_folders = [f if "://" in f else os.path.abspath(os.path.expanduser(f)) for f in d.keep_folders]
    if d.not_duplicates is not None:
        if not os.path.isfile(d.not_duplicates):
            raise ConfigError(f"dedup.not_duplicates: file not found: {d.not_duplicates!r}")
        d.not_duplicates = os.path.abspath(d.not_duplicates)
    if not 1 <= r.groups_per_page <= 1000:
        raise ConfigError(f"report.groups_per_page must be in [1, 1000], got {r.groups_per_page!r}")
    if not 32 <= r.thumb_px <= 1024 or not 1 <= r.thumb_quality <= 95:
        raise ConfigError(f"report.thumb_px must be in [32, 1024] and report.thumb_quality in [1, 95], "
                          f"got {r.thumb_px!r}, {r.thumb_quality!r}")
    if d.incremental not in ("auto", "always", "never") or d.incremental_max_new < 0:
        raise ConfigError(f"dedup.incremental must be auto, always or never and dedup.incremental_max_new >= 0, "
                          f"got {d.incremental!r}, {d.incremental_max_new!r}")
    q = config.query
    if d.driver_max_images < 0:
        raise ConfigError(f"dedup.driver_max_images must be >= 0, got {d.driver_max_images!r}")
    if q.force_path not in ("auto", "light", "spark") or q.max_light_files < 0:
        raise ConfigError(f"query.force_path must be auto, light or spark and query.max_light_files >= 0, "
                          f"got {q.force_path!r}, {q.max_light_files!r}")
    if a.mode not in APPLY_MODES:
        raise ConfigError(f"apply.mode must be one of {', '.join(APPLY_MODES)}, got {a.mode!r}")
    if config.progress not in ("auto", "always", "never"):
        raise ConfigError(f"progress must be auto, always or never, got {config.progress!r}")
