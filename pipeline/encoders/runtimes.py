"""Inference runtimes for the CNN encoders: TensorFlow (the reference, and the GPU path) or
OpenVINO (CPU inference, fp32 / bf16 / int8).

The driver decides, once per embed stage (:func:`prepare`): it converts the TensorFlow graph
(scaling, CNN, pooling, L2 normalisation, all in one) with OpenVINO's converter, quantizes it
to int8 with NNCF when asked, checks the result against TensorFlow on a fixed set of
generated images, and stores the OpenVINO IR in a cache folder. Executors only read that IR
(:func:`load`), so a Python worker on the OpenVINO path never imports TensorFlow. Whatever
fails (OpenVINO not installed, a layer the converter does not know, a check that does not
pass, an IR an executor cannot read) falls back to TensorFlow with the reason logged.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.encoders import backbones

log = logging.getLogger(__name__)

# What int8 calibrates on without embed.calibration_input (a new set: a new conversion).
BUILTIN_CALIBRATION = "builtin: crops of scikit-image photos, v1"
# Cosine between a converted model's descriptors and TensorFlow's on the check images,
# below which the converted model is refused (fp32 conversions agree to ~1e-6; bf16 and
# int8 lose a little: measured 0.997+ for bf16 on MobileNet, see README "Speed").
MIN_COSINE = {"fp32": 0.9999, "bf16": 0.97, "int8": 0.85}
# ... and the mean cosine (int8 moves a few images a lot, most very little).
MIN_MEAN_COSINE = {"fp32": 0.9999, "bf16": 0.99, "int8": 0.95}
CHECK_IMAGES = 8
# How int8 is quantized (:func:`_quantize`): a new value, a new conversion (older IRs are not reused).
QUANTIZATION = "v2: full bias correction"
_OV_HINT = {"fp32": "f32", "bf16": "bf16"}


@dataclass(frozen=True)
class RuntimeChoice:
    """What the executors run: decided on the driver, shipped with the embed function."""

    runtime: str = "tensorflow"  # tensorflow | openvino
    precision: str = "fp32"  # fp32 | bf16 | int8
    ir_path: str | None = None  # the OpenVINO IR (model.xml) on the executors' filesystem
    reason: str = ""  # why this runtime (logged, recorded with the run)


def cpu_flags() -> list[str]:
    """The CPU's instruction-set flags that matter for reduced precision (Linux /proc/cpuinfo)."""
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8", "amx_tile",
              "avx512_fp16")
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
    except OSError:
        return []
    return [f for f in wanted if f in flags]


def openvino_version() -> str | None:
    try:
        import openvino as ov
    except ImportError:
        return None
    return ov.get_version()


def native_bf16() -> bool:
    """Whether the CPU computes in bf16 natively (AMX or AVX512-BF16), where bf16 pays off."""
    return any(f in cpu_flags() for f in ("amx_bf16", "avx512_bf16"))


def native_int8() -> bool:
    """Whether the CPU has int8 dot-product instructions (VNNI or AMX). Without them (AVX2 only)
    int8 convolutions multiply u8 by s8 into saturating 16-bit sums: see :func:`_quantize`."""
    return any(f in cpu_flags() for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def resolve_precision(requested: str) -> str:
    """``auto``: int8 on CPUs with AVX2, else fp32.

    int8 as :func:`_quantize` makes it stays at bf16's distance from fp32 and ran the model
    faster than every other precision on both CPUs measured. On the Intel Xeon with AMX
    (2026-12-01 11:30 UTC): 1.40x bf16's images/s in the model loop, the default run 170 against
    146 images/s, ukbench-dev N-S 3.980 and holidays-dev mAP 0.913 (bf16: 3.980, 0.929; fp32:
    3.980, 0.924), the demo 1.000 / 1.000. On the AVX2-only AMD EPYC: 2x fp32's images/s, N-S
    3.984, mAP 0.919. A model that fails its check falls back (:func:`fallback_precisions`).
    """
    if requested != "auto":
        return requested
    return "int8" if "avx2" in cpu_flags() else "fp32"


def fallback_precisions(precision: str) -> tuple[str, ...]:
    """What :func:`prepare` tries, in order: the precision, then bf16 where the CPU computes it
    natively (after a failed int8), then fp32, the fastest that needs no check to be close."""
    chain = [precision]
    if precision == "int8" and native_bf16():
        chain.append("bf16")
    return tuple(dict.fromkeys([*chain, "fp32"]))


def _tensorflow(precision: str, reason: str) -> RuntimeChoice:
    return RuntimeChoice("tensorflow", "fp32", None, reason)


def _gpu_visible() -> bool:
    # Without an NVIDIA device node there is no GPU for TensorFlow to see: skip importing it
    # (seconds), which matters to the light query path and to every short job.
    if not any(os.path.exists(p) for p in ("/dev/nvidia0", "/dev/nvidiactl", "/proc/driver/nvidia")):
        return False
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def prepare(key: backbones.ModelKey, runtime: str, precision: str, cache_dir: str,
            calibration: Sequence[str] = (), max_pixels: int = 178_956_970,
            calibration_images: int = 128) -> RuntimeChoice:
    """Decide the runtime on the driver; for OpenVINO, convert, check and cache the IR.

    Never raises for a runtime problem: TensorFlow is the fallback, with the reason logged.
    """
    precision = resolve_precision(precision)
    if runtime == "tensorflow":
        return _tensorflow(precision, "embed.runtime: tensorflow")
    version = openvino_version()
    if version is None:
        return _fallback(runtime, "OpenVINO is not installed (pip install 'neardup[openvino]')")
    if _gpu_visible() and runtime == "auto":
        return _tensorflow(precision, "a GPU is visible: TensorFlow runs on it")
    failed = ""
    for attempt in fallback_precisions(precision):
        try:
            path = _ensure_ir(key, attempt, cache_dir, calibration, max_pixels, version, calibration_images)
        except Exception as exc:  # converter, quantizer or check: the next precision, then TensorFlow
            failed += f"OpenVINO {attempt} for {key.backbone} failed: {type(exc).__name__}: {exc}; "
            continue
        if failed:
            log.warning("embed.precision=%s: using %s instead: %s", precision, attempt, failed.rstrip("; "))
        return RuntimeChoice("openvino", attempt, path, failed + f"OpenVINO {version}, {attempt}, checked against TensorFlow")
    return _fallback(runtime, failed.rstrip("; "))


def _fallback(requested: str, reason: str) -> RuntimeChoice:
    log.warning("embed.runtime=%s: using TensorFlow instead: %s", requested, reason)
    return RuntimeChoice("tensorflow", "fp32", None, "fallback: " + reason)


def _network_key(key: backbones.ModelKey) -> backbones.ModelKey:
    # Rotation only changes decoding; post-processing runs in numpy after the network.
    return dataclasses.replace(key, rotation=0, postprocess=None, postprocess_version=None, power_norm=1.0)


def _ir_folder(key: backbones.ModelKey, precision: str, cache_dir: str, calibration: Sequence[str],
               version: str) -> Path:
    from pipeline.encoders.base import file_identity

    network = _network_key(key)
    ident = {"key": dataclasses.asdict(network), "precision": precision, "openvino": version,
             "calibration": sorted(calibration) if precision == "int8" else [],
             **({"quantization": QUANTIZATION, "overflow_fix": not native_int8()} if precision == "int8" else {}),
             "files": file_identity([network.backbone, network.weights])}
    digest = hashlib.sha1(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]
    tag = Path(key.backbone).stem if backbones.is_model_file(key.backbone) else key.backbone
    return Path(cache_dir) / f"{tag}-{precision}-{digest}"


def _ensure_ir(key, precision: str, cache_dir: str, calibration: Sequence[str], max_pixels: int,
               version: str, calibration_images: int) -> str:
    import openvino as ov

    calibrated_on = list(calibration) or [BUILTIN_CALIBRATION]
    folder = _ir_folder(key, precision, cache_dir, [*calibrated_on, str(calibration_images)], version)
    xml = folder / "model.xml"
    done = folder / "checked.json"
    if done.exists() and xml.exists():
        return str(xml)
    # A model converted and checked for another workdir on this machine: copied, not converted again.
    user = user_cache_dir()
    reused = user / folder.name if user is not None else None
    if reused is not None and reused != folder and _copy_checked(reused, folder):
        log.info("OpenVINO %s model for %s copied from %s", precision, key.backbone, reused)
        return str(xml)
    tf_model = backbones.load_embedding_model(_network_key(key))
    ov_model = ov.convert_model(tf_model._embed.get_concrete_function())
    images = check_images(key)
    if precision == "int8":
        samples = calibration_samples(key, calibration, max_pixels, calibration_images)
        ov_model = _quantize(ov_model, samples, calibration)
        # int8 is checked on real images (calibration ones): generated ones lie outside what
        # it was calibrated for, and measure nothing useful (min cosine 0.66 there, 0.94 on ukbench).
        images = samples[:CHECK_IMAGES]
    expected = np.concatenate([tf_model(b) for b in images])
    compiled = ov.Core().compile_model(ov_model, "CPU", compile_config(precision, 0))
    got = _unit(np.concatenate([compiled(b)[0] for b in images]))
    cosines = np.sum(got * expected, axis=1)
    cosine, mean = float(np.min(cosines)), float(np.mean(cosines))
    if not np.isfinite(cosine) or cosine < MIN_COSINE[precision] or mean < MIN_MEAN_COSINE[precision]:
        raise ValueError(f"descriptors differ from TensorFlow's (cosine min {cosine:.4f}, mean {mean:.4f}; "
                         f"wanted >= {MIN_COSINE[precision]}, {MIN_MEAN_COSINE[precision]})")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"model.{os.getpid()}.xml"
    ov.save_model(ov_model, str(tmp), compress_to_fp16=False)
    os.replace(tmp.with_suffix(".bin"), folder / "model.bin")
    os.replace(tmp, xml)
    with open(done, "w", encoding="utf-8") as fh:
        json.dump({"min_cosine": cosine, "mean_cosine": mean, "openvino": version, "precision": precision,
                   "cpu_flags": cpu_flags()}, fh)
    log.info("OpenVINO %s model for %s at %s (min cosine to TensorFlow %.5f)", precision, key.backbone, xml, cosine)
    if reused is not None and reused != folder:
        _copy_checked(folder, reused)
    return str(xml)


_CHECKED_FILES = ("model.xml", "model.bin", "checked.json")


def user_cache_dir() -> Path | None:
    """This user's cache of checked conversions (``$XDG_CACHE_HOME/neardup/openvino``, by
    default ``~/.cache/neardup/openvino``), shared by the workdirs of this machine the way
    Keras keeps its weights in ``~/.keras``. The executors still read the copy in the
    workdir's cache (a folder they can reach); None when ``$NEARDUP_MODEL_CACHE`` is set."""
    if os.environ.get("NEARDUP_MODEL_CACHE"):  # the shared cache already is the one place
        return None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    if not base or base.startswith("~"):
        return None
    return Path(base) / "neardup" / "openvino"


def _copy_checked(source: Path, target: Path) -> bool:
    """Copy a checked conversion (files renamed into place, checked.json last, so a reader never
    sees half of one); False when ``source`` has none or the copy fails (then: convert)."""
    import shutil

    if not all((source / name).is_file() for name in _CHECKED_FILES):
        return False
    try:
        target.mkdir(parents=True, exist_ok=True)
        for name in _CHECKED_FILES:
            tmp = target / f".{name}.{os.getpid()}"
            shutil.copyfile(source / name, tmp)
            os.replace(tmp, target / name)
    except OSError as exc:
        log.info("could not copy a converted model from %s to %s: %s", source, target, exc)
        return False
    return True


def check_images(key: backbones.ModelKey) -> list[np.ndarray]:
    """Fixed generated test images (gradients, blocks of colour, noise), batched by shape."""
    rng = np.random.default_rng(0)
    side = key.input_size
    short = max(32, side * 3 // 4 // 16 * 16)
    shapes = [(side, side)] if key.input_mode == "squash" else [(short, side), (side, short)]
    return [np.stack([_scene(rng, h, w) for _ in range(CHECK_IMAGES // len(shapes))]) for h, w in shapes]


def _scene(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    image = np.stack([x / w, y / h, (x + y) / (w + h)], axis=-1) * rng.uniform(60, 200, 3)
    for _ in range(6):
        top, left = rng.integers(0, h - 8), rng.integers(0, w - 8)
        image[top:top + rng.integers(8, h // 2), left:left + rng.integers(8, w // 2)] = rng.uniform(0, 255, 3)
    image += rng.normal(0, 8, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def calibration_samples(key, calibration: Sequence[str], max_pixels: int, limit: int) -> list[np.ndarray]:
    """Calibration images decoded for the network, each a batch of one (shapes differ in aspect mode)."""
    from pipeline.core import preprocess

    samples = []
    if calibration:
        contents = (_read(path) for path in calibration_files(calibration, limit))
    else:  # no folders given: crops of the photos scikit-image ships (never the searched collection)
        from pipeline.core import sample_photos

        contents = iter(sample_photos.calibration_jpegs(limit))
    for content in contents:
        try:
            pixels = preprocess.decode_for_model(content, key.input_size, max_pixels, mode=key.input_mode,
                                                 trim=key.trim_borders, size_multiple=key.size_multiple)
        except Exception:  # an undecodable calibration file is skipped
            continue
        samples.append(pixels[None])
        if len(samples) >= limit:
            break
    return samples


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError:
        return None


def _quantize(ov_model, samples: list[np.ndarray], calibration: Sequence[str]):
    import nncf

    if len(samples) < 16:
        where = f"in embed.calibration_input {list(calibration)}" if calibration else "among the built-in photos"
        raise ValueError(f"int8 needs at least 16 decodable calibration images, found {len(samples)} {where}")
    # Without VNNI, int8 convolutions sum pairs of u8*s8 products in saturating 16-bit registers;
    # NNCF's overflow fix (7-bit weights in every layer, not only the first) avoids that. Full
    # bias correction (not the fast one) re-fits each layer's bias on the calibration images.
    # Measured on an AVX2-only AMD EPYC (2026-12-01, 96 ukbench-dev views, cosine to TensorFlow):
    # fast correction, first-layer fix: mean 0.90 (refused by the check); overflow fix: 0.966;
    # overflow fix and full correction: mean 0.997, min 0.992 (bf16's figures), 2x fp32's speed,
    # 12 s to quantize instead of 7.
    fix = nncf.OverflowFix.FIRST_LAYER if native_int8() else nncf.OverflowFix.ENABLE
    return nncf.quantize(ov_model, nncf.Dataset(samples), subset_size=len(samples),
                         preset=nncf.QuantizationPreset.PERFORMANCE, fast_bias_correction=False,
                         advanced_parameters=nncf.AdvancedQuantizationParameters(overflow_fix=fix))


def calibration_files(folders: Sequence[str], limit: int) -> list[str]:
    """Image files under the calibration folders, in a fixed order, spread over the folders."""
    exts = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
    files = []
    for folder in folders:
        for root, _, names in sorted(os.walk(folder)):
            files.extend(os.path.join(root, n) for n in sorted(names) if Path(n).suffix.lower() in exts)
    step = max(1, len(files) // limit)
    return files[::step]


def compile_config(precision: str, threads: int) -> dict:
    """OpenVINO CPU settings: precision, one stream, ``threads`` threads (0: OpenVINO's default)."""
    # int8 layers run in int8; what stays float runs in bf16 where the CPU has it.
    hint = _OV_HINT.get(precision) or ("bf16" if native_bf16() else "f32")
    config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    if threads > 0:
        # Spark runs one task per core already; unpinned, so two workers never share one core.
        config.update({"INFERENCE_NUM_THREADS": int(threads), "ENABLE_CPU_PINNING": False})
    return config


def default_cache_dir(workdir_local: str | None) -> str:
    """Where converted models live: ``$NEARDUP_MODEL_CACHE`` when set (a folder every executor
    can read, shared by workdirs: each model is converted once), else ``<workdir>/models/openvino``
    on a local workdir, else a temp folder. Folder names carry the model's digest, so sharing is safe."""
    shared = os.environ.get("NEARDUP_MODEL_CACHE")
    if shared:
        return os.path.join(shared, "openvino")
    if workdir_local:
        return os.path.join(workdir_local, "models", "openvino")
    return os.path.join(tempfile.gettempdir(), "neardup-openvino")


def _unit(X: np.ndarray) -> np.ndarray:
    # Quantized graphs end a little off the unit sphere (the normalisation runs on int8 inputs).
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


class OpenVinoEmbeddingModel:
    """The same interface as :class:`pipeline.encoders.backbones.EmbeddingModel`, on OpenVINO."""

    def __init__(self, key: backbones.ModelKey, choice: RuntimeChoice, threads: int):
        import openvino as ov

        self.key = key
        self.choice = choice
        core = ov.Core()
        self._compiled = core.compile_model(core.read_model(choice.ir_path), "CPU",
                                            compile_config(choice.precision, threads))
        self._request = self._compiled.create_infer_request()
        self.features_dim = int(self._compiled.outputs[0].get_partial_shape()[-1].get_length())
        self.whitening = backbones.load_postprocess(key, self.features_dim)
        self.dim = self.whitening.dim if self.whitening is not None else self.features_dim

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        out = self._request.infer([np.ascontiguousarray(batch, dtype=np.uint8)])
        return _unit(np.array(next(iter(out.values())), dtype=np.float32))

    def postprocess(self, X: np.ndarray) -> np.ndarray:
        return backbones.apply_postprocess(self.key, self.whitening, X)


_CACHE: dict[tuple, object] = {}


def load(key: backbones.ModelKey, choice: RuntimeChoice, threads: int):
    """The embedding model for ``choice``, once per Python worker; TensorFlow when OpenVINO fails here."""
    if choice.runtime == "openvino":
        cache_key = (dataclasses.replace(key, rotation=0), choice, threads)
        model = _CACHE.get(cache_key)
        if model is None:
            try:
                model = OpenVinoEmbeddingModel(cache_key[0], choice, threads)
            except Exception as exc:
                log.warning("OpenVINO model %s not usable in this worker (%s: %s): using TensorFlow",
                            choice.ir_path, type(exc).__name__, exc)
                choice = _tensorflow(choice.precision, f"worker fallback: {exc}")
            else:
                _CACHE.clear()
                _CACHE[cache_key] = model
        if choice.runtime == "openvino":
            if key.rotation:
                import copy

                model = copy.copy(model)
                model.key = key
            return model
    backbones.configure_tensorflow_threads(threads)
    return backbones.load_embedding_model(key)
