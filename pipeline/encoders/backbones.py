"""The backbone registry: which CNN, its input size, its preprocessing, and how to load it.

Importing this module does not import TensorFlow (config validation and the driver's
argument checks use the registry); :func:`load_embedding_model` does, on first use.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.core import pooling, vectors, whitening

log = logging.getLogger(__name__)

PREPROCESS_MODES = ("tf", "torch", "caffe", "lite", "raw")


class WeightsUnavailableError(RuntimeError):
    """ImageNet weights are neither in the Keras cache nor downloadable."""


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    constructor: str  # attribute of keras.applications
    input_size: int
    preprocess: str  # one of PREPROCESS_MODES
    kwargs: tuple = ()  # extra constructor kwargs, as sorted (key, value) pairs
    fixed_input: bool = False  # True: the network only accepts input_size x input_size


# The nine networks of the reference study, plus three newer ones and the MobileNet width
# variants whose ImageNet weights ship with the test data.
REGISTRY: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in [
        BackboneSpec("vgg16", "VGG16", 224, "caffe"),
        BackboneSpec("vgg19", "VGG19", 224, "caffe"),
        BackboneSpec("resnet50", "ResNet50", 224, "caffe"),
        BackboneSpec("densenet121", "DenseNet121", 224, "torch"),
        BackboneSpec("densenet169", "DenseNet169", 224, "torch"),
        BackboneSpec("densenet201", "DenseNet201", 224, "torch"),
        BackboneSpec("nasnetmobile", "NASNetMobile", 224, "tf", fixed_input=True),
        BackboneSpec("mobilenet", "MobileNet", 224, "tf", (("alpha", 1.0),)),
        BackboneSpec("inceptionresnetv2", "InceptionResNetV2", 299, "tf"),
        BackboneSpec("mobilenetv2", "MobileNetV2", 224, "tf", (("alpha", 1.0),)),
        # These two scale their own inputs (include_preprocessing=True): feed raw 0..255.
        BackboneSpec("efficientnetv2b0", "EfficientNetV2B0", 224, "raw"),
        BackboneSpec("convnexttiny", "ConvNeXtTiny", 224, "raw"),
        BackboneSpec("mobilenet-0.25", "MobileNet", 224, "tf", (("alpha", 0.25),)),
        BackboneSpec("mobilenetv2-0.35", "MobileNetV2", 224, "tf", (("alpha", 0.35),)),
    ]
}

STUDY_BACKBONES = ("vgg16", "vgg19", "resnet50", "densenet121", "densenet169", "densenet201",
                   "nasnetmobile", "mobilenet", "inceptionresnetv2")


def supports_any_size(backbone: str) -> bool:
    """Whether the network can run fully convolutionally on any input size (``aspect`` input)."""
    return not is_model_file(backbone) and not REGISTRY[backbone].fixed_input


def is_model_file(backbone: str) -> bool:
    return backbone.endswith(".keras")


def input_size_of(backbone: str, override: int | None = None) -> int:
    if override:
        return int(override)
    if is_model_file(backbone):
        return 224
    return REGISTRY[backbone].input_size


def preprocess_mode_of(backbone: str, override: str | None = None) -> str:
    if override:
        return override
    if is_model_file(backbone):
        return "tf"
    return REGISTRY[backbone].preprocess


def keras_cache_dir() -> Path:
    """Where Keras looks for downloaded weights (same rule as keras.utils.get_file)."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    if not os.access(home if os.path.exists(home) else os.path.dirname(home), os.W_OK):
        home = os.path.join("/tmp", ".keras")
    return Path(home) / "models"


# ------------------------------------------------------------------ loading
@dataclass(frozen=True)
class ModelKey:
    """Everything, besides the image bytes, that decides an embedding (the fingerprint of a table)."""

    backbone: str
    weights: str
    layer: str | None
    preprocess: str
    input_size: int
    pooling: str = "avg"
    input_mode: str = "squash"  # squash | aspect
    max_side: int = 320
    size_multiple: int = 16
    scales: tuple = (1.0,)
    gem_p: float = 3.0
    rmac_levels: int = 3
    trim_borders: bool = False
    power_norm: float = 1.0
    postprocess: str | None = None  # URI of a post-processing artifact (.npz)
    postprocess_version: str | None = None  # its content hash
    rotation: int = 0
    runtime: str = "tensorflow"  # embed.runtime as set (the executors run what the driver chose)
    precision: str = "fp32"  # embed.precision as set


class EmbeddingModel:
    """A Keras backbone wrapped as uint8 images -> L2-normalised float32 descriptors.

    Scaling, the CNN, pooling and normalisation all run in one compiled TensorFlow graph,
    so on a GPU executor only uint8 pixels cross the bus. In ``aspect`` mode the network
    runs fully convolutionally: the graph accepts any (H, W); callers batch same-size images.
    :meth:`postprocess` applies the signed power normalisation and the learned projection.
    """

    def __init__(self, key: ModelKey):
        import tensorflow as tf


        self.key = key
        features = _build_feature_model(key)
        self.features_dim = int(features.output_shape[-1])
        mode = key.preprocess
        side = None if key.input_mode == "aspect" else key.input_size

        @tf.function(input_signature=[tf.TensorSpec([None, side, side, 3], tf.uint8)], reduce_retracing=True)
        def embed(batch):
            x = scale_pixels(tf.cast(batch, tf.float32), mode)
            y = features(x, training=False)
            if len(y.shape) == 4:  # a feature map: pool it here
                y = pooling.pool_feature_map(tf.cast(y, tf.float32), key.pooling, gem_p=key.gem_p,
                                                 rmac_levels=key.rmac_levels, normalize=False)
            return vectors.l2_normalize_tf(tf.cast(y, tf.float32))

        self._embed = embed
        self.whitening = load_postprocess(key, self.features_dim)
        self.dim = self.whitening.dim if self.whitening is not None else self.features_dim

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Same-shape uint8 batch (n, H, W, 3) -> pooled, L2-normalised (n, features_dim)."""
        return self._embed(batch).numpy()

    def postprocess(self, X: np.ndarray) -> np.ndarray:
        """Pooled descriptors -> final embeddings (power normalisation, learned projection, L2)."""
        return apply_postprocess(self.key, self.whitening, X)


def load_postprocess(key: ModelKey, features_dim: int):
    """The learned post-processing of ``key`` (None when there is none), checked against the backbone."""
    if not key.postprocess:
        return None
    loaded = whitening.load_whitening_uri(key.postprocess)
    if loaded.input_dim != features_dim:
        raise ValueError(f"post-processing {key.postprocess} expects {loaded.input_dim}-d "
                         f"descriptors, backbone {key.backbone} gives {features_dim}-d")
    return loaded


def apply_postprocess(key: ModelKey, learned, X: np.ndarray) -> np.ndarray:
    """Pooled descriptors -> final embeddings (power normalisation, learned projection, L2)."""
    X = np.asarray(X, dtype=np.float32)
    if key.power_norm != 1.0:
        X = whitening.power_normalise(X, key.power_norm)
    if learned is not None:
        X = learned.apply(X)
    return vectors.l2_normalize(X)


def scale_pixels(x, mode: str):
    """The backbone's expected input scaling, on a float tensor of 0..255 RGB."""
    import tensorflow as tf

    if mode == "tf":
        return x / 127.5 - 1.0
    if mode == "torch":
        mean = tf.constant([0.485, 0.456, 0.406]) * 255.0
        std = tf.constant([0.229, 0.224, 0.225]) * 255.0
        return (x - mean) / std
    if mode == "caffe":
        return x[..., ::-1] - tf.constant([103.939, 116.779, 123.68])
    if mode == "lite":
        return (x - 127.0) / 128.0
    if mode == "raw":
        return x
    raise ValueError(f"unknown preprocess mode {mode!r}")


def _build_feature_model(key: ModelKey):
    import keras

    if is_model_file(key.backbone):
        return _feature_model_from_file(key.backbone, key.layer)
    spec = REGISTRY[key.backbone]
    weights = None if key.weights == "none" else key.weights
    constructor: Callable = getattr(keras.applications, spec.constructor)
    kwargs = dict(spec.kwargs)
    side = spec.input_size if spec.fixed_input else key.input_size
    shape = (None, None, 3) if key.input_mode == "aspect" and not spec.fixed_input else (side, side, 3)
    try:
        import warnings

        with warnings.catch_warnings():  # "input shape undefined: loading the 224 weights" is intended
            warnings.simplefilter("ignore")
            return constructor(include_top=False, weights=weights, input_shape=shape, pooling=None, **kwargs)
    except Exception as exc:  # keras raises a bare Exception on a failed download
        if weights == "imagenet" and ("URL fetch failure" in str(exc) or "fetch" in str(exc).lower()):
            raise WeightsUnavailableError(
                f"ImageNet weights for backbone {key.backbone!r} are not in the Keras cache "
                f"({keras_cache_dir()}) and could not be downloaded ({exc}). Either run once with internet "
                f"access, or copy the Keras weight file into $KERAS_HOME/models/ (default ~/.keras/models/), "
                f"or pass --weights /path/to/weights.h5, or use --weights none for timing only."
            ) from exc
        raise


def _feature_model_from_file(path: str, layer_name: str | None):
    """A user's .keras file, cut at ``layer_name`` or at its last global-pooling layer."""
    import keras

    # safe_mode refuses Lambda layers with pickled Python code inside the file.
    model = keras.models.load_model(path, compile=False, safe_mode=True)
    if layer_name:
        try:
            layer = model.get_layer(layer_name)
        except ValueError as exc:
            raise ValueError(f"layer {layer_name!r} not found in {path}; layers: "
                             f"{', '.join(lay.name for lay in model.layers[-8:])} ...") from exc
    else:
        pools = [lay for lay in model.layers
                 if isinstance(lay, (keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D))]
        if not pools:
            raise ValueError(f"{path} has no global pooling layer; name the embedding layer with embed.layer")
        layer = pools[-1]
    return keras.Model(model.inputs, layer.output, name=f"{Path(path).stem}_at_{layer.name}")


_MODEL_CACHE: dict[ModelKey, EmbeddingModel] = {}


def load_embedding_model(key: ModelKey) -> EmbeddingModel:
    """Load once per Python process: Spark reuses its Python workers across tasks.

    One network per worker: a different one replaces it (``evaluate`` over many backbones
    would otherwise hold them all). ``rotation`` only changes decoding, so the rotated
    query passes share the loaded network.
    """
    network = dataclasses.replace(key, rotation=0)
    model = _MODEL_CACHE.get(network)
    if model is None:
        configure_tensorflow_devices()
        log.info("loading backbone %s (weights=%s)", key.backbone, key.weights)
        _MODEL_CACHE.clear()
        model = _MODEL_CACHE[network] = EmbeddingModel(network)
    if key.rotation:
        model = copy.copy(model)
        model.key = key
    return model


_DEVICES_CONFIGURED = False


def configure_tensorflow_threads(threads: int) -> None:
    """Cap TensorFlow's CPU threads per Python worker (0: TensorFlow's default, all cores).

    Spark already runs one task per core; with TensorFlow's default every worker spawns a
    thread per core too, and the workers fight over the cores. Must run before TensorFlow
    executes anything in this process (it is fixed at the first op).
    """
    if threads <= 0:
        return
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:  # TensorFlow already initialised in this worker: keep what it has
        pass


def configure_tensorflow_devices() -> None:
    """Pin TensorFlow to the GPU that Spark assigned to this task, with memory growth.

    Without this every Python worker on a multi-GPU executor would grab all GPUs' memory.
    Must run before TensorFlow touches a GPU, hence before the first model load.
    """
    global _DEVICES_CONFIGURED
    if _DEVICES_CONFIGURED:
        return
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        assigned = _spark_task_gpu_addresses()
        if assigned:
            wanted = [g for g in gpus if g.name.rsplit(":", 1)[-1] in assigned] or gpus[:1]
            tf.config.set_visible_devices(wanted, "GPU")
            gpus = wanted
        for gpu in gpus:
            try:
                tf.config.experimental.set_memory_growth(gpu, True)
            except RuntimeError:  # already initialised by an earlier caller in this process
                pass
        log.info("TensorFlow uses GPU(s) %s", [g.name for g in gpus])
    _DEVICES_CONFIGURED = True


def _spark_task_gpu_addresses() -> list[str]:
    try:
        from pyspark import TaskContext
    except ImportError:
        return []
    ctx = TaskContext.get()
    if ctx is None:
        return []
    resource = ctx.resources().get("gpu")
    return list(resource.addresses) if resource is not None else []
