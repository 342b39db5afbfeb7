"""One typed configuration object, built from YAML plus ``--set key=value`` overrides.

Everything a job needs is in :class:`Config`; nothing is read from globals. The config is
validated before any Spark work starts so that a typo fails in a second, not after an
hour of embedding (the img2dataset ``arguments_validator`` pattern).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from pipeline.config.checks import (  # noqa: F401 (re-exported)
    APPLY_MODES, INPUT_MODES, KEEP_POLICIES, POOLING_METHODS, PAIR_SCORES, validate_descriptor_options,
    validate_pair_score, validate_review_options)
from pipeline.config.parsing import (  # noqa: F401 (re-exported)
    ConfigError, _build, local_path_of, parse_memory, parse_override, set_dotted)

DEFAULT_CONF_PATH = Path(__file__).resolve().parent.parent.parent / "conf" / "default.yaml"

INDEX_TYPES = ("auto", "flat", "ivf_flat", "ivf_sq", "ivf_pq", "hnsw")
WEIGHTS_SPECIAL = ("imagenet", "none")


@dataclass
class SparkSettings:
    master: str = "local[*,4]"  # 4 attempts per task: local mode otherwise never retries
    app_name: str = "neardup"
    # Extra Spark properties, passed through untouched (spark.executor.resource.gpu.amount ...).
    conf: dict[str, Any] = field(default_factory=dict)


@dataclass
class IngestSettings:
    input: list[str] = field(default_factory=list)
    # Bounded shard size keeps a single Parquet file readable by one task on a small executor.
    max_shard_bytes: int = 128 * 1024 * 1024
    max_pixels: int = 178_956_970
    follow_symlinks: bool = True
    # False: the image table holds metadata and later stages read each file from its path (no
    # second copy of the archive); True: it keeps the bytes, for inputs that will disappear.
    store_content: bool = False


@dataclass
class EmbedSettings:
    backbone: str = "mobilenet"
    weights: str = "imagenet"
    # For a user's own .keras file: which layer gives the embedding (default: last global pooling).
    layer: str | None = None
    # For a user's own .keras file: how its inputs are scaled (tf | torch | caffe | lite | raw).
    preprocess: str | None = None
    input_size: int | None = None
    # Descriptor options (issue 3). input: squash = resize to input_size x input_size (the
    # reference study); aspect = keep the aspect ratio, longest side max_side, the network run
    # fully convolutionally (sides rounded to size_multiple, so few distinct batch shapes).
    input: str = "aspect"
    max_side: int = 320
    size_multiple: int = 16
    # Relative input scales; descriptors of all scales are L2-normalised, summed, re-normalised.
    scales: list[float] = field(default_factory=lambda: [1.0])
    pooling: str = "avg"  # avg | max | gem | rmac
    gem_p: float = 3.0
    rmac_levels: int = 3
    # Crop plain-colour borders (scanned prints, letterboxing) before resizing.
    trim_borders: bool = True
    # Signed power normalisation exponent applied to the pooled descriptor (1.0: off, 0.5: sqrt).
    power_norm: float = 1.0
    # Learned post-processing (PCA-whitening / centring) from `neardup train`: a .npz path,
    # an MLflow run id, runs:/<id>/... URI, or none.
    postprocess: str | None = None
    # Rotate every image by this many degrees before embedding (internal: rotated query variants).
    rotation: int = 0
    batch_size: int = 32
    # Rows per Arrow batch handed to the UDF; a multiple of batch_size avoids ragged model calls.
    arrow_batch_rows: int = 256
    # A test hook for fault-tolerance tests: the first attempt of the task whose partition
    # holds this image id kills its Python worker once (see pipeline.stages.embed).
    fail_once_on_image: str | None = None
    # TensorFlow CPU threads per Python worker (0: TensorFlow's default, one per core). Spark runs
    # a task per core already, so one thread each avoids oversubscription (measured: make bench).
    tf_threads: int = 1
    # Inference runtime (issue 10): auto (OpenVINO on CPU when installed and it passes its check
    # against TensorFlow, else TensorFlow) | tensorflow (the reference; the GPU path) | openvino.
    runtime: str = "auto"
    # OpenVINO precision: auto (int8 where the CPU has AVX2, else fp32) | fp32 | bf16 |
    # int8 (post-training quantization calibrated on calibration_input, never the searched images;
    # empty: on crops of the photos scikit-image ships).
    precision: str = "auto"
    calibration_input: list[str] = field(default_factory=list)
    # Rotated queries (dedup.rotations): embed the rotated views in the embed stage's pass, from
    # the same decode, instead of one more pass over the images per rotation (same vectors).
    views_in_one_pass: bool = True
    calibration_images: int = 128  # int8: at most this many, spread over calibration_input


@dataclass
class IndexSettings:
    # auto: exact (Flat) up to auto_flat_max vectors, above that IVF with fp16 codes sized from
    # the number of vectors and max_memory (the choice and its reason go into index.json).
    type: str = "auto"
    shards: int = 0  # 0: derived from max_memory (each shard fits one task); >0: forced
    # Memory one task may use for the shard it searches (FAISS-style size: 512m, 4g ...).
    max_memory: str = "4g"
    auto_flat_max: int = 50_000  # auto: exact search up to this many vectors (measured crossover)
    nlist: int = 0  # 0: derived from the number of vectors (autofaiss: power of 2 near 4*sqrt(n))
    sq_type: str = "fp16"  # ivf_sq / auto codes: fp16 (cosine within ~1e-4) | 8bit
    pq_m: int = 16
    pq_bits: int = 8
    hnsw_m: int = 32
    nprobe: int = 0  # 0: from the list count (faiss_index.auto_nprobe: 16 up to 1,024 lists, then 16*sqrt(nlist/1024))
    ef_search: int = 128
    # Training vectors for IVF / PQ: at most this many (0: 64 per list); streamed through Parquet.
    train_sample: int = 100_000
    # Queries per search block inside one task (bounds the task's memory with the shard size).
    query_block: int = 16384
    use_gpu: str = "auto"  # auto | never | always


@dataclass
class DedupSettings:
    # score: calibrated -> threshold is the expected pair precision (the calibrated probability
    # that a pair is a duplicate, pipeline.core.calibration); score: cosine -> a cosine similarity.
    threshold: float = 0.9
    score: str = "calibrated"
    # Calibration artifact (.npz from `make calibrate`); null: the one shipped in the package for
    # the embedding space (raw, or centred when embed.postprocess is set).
    calibration: str | None = None
    k: int = 20
    # Database-side augmentation: each database vector is replaced by the alpha-weighted sum of
    # its dba_k nearest neighbours (itself included) before the final search; 0 or 1: off.
    dba_k: int = 3
    dba_alpha: float = 3.0
    # alpha-query expansion: a second search with each query plus its qe_k best neighbours; 0: off.
    qe_k: int = 0
    qe_alpha: float = 3.0
    # Also search every query as these rotations (degrees, counter-clockwise) and keep the best
    # similarity per neighbour: finds near-duplicates stored rotated by 90 degrees.
    rotations: list[int] = field(default_factory=lambda: [0, 90, 270])

    # Perceptual hashes only: pairs within this many differing bits (overrides threshold for them).
    hamming_bits: int | None = None
    # Which image of a group is kept (pipeline.core.grouping.keep_order_key): pixels | largest |
    # oldest | newest; files under keep_folders win first (earlier folders first).
    keep: str = "pixels"
    keep_folders: list[str] = field(default_factory=list)
    # CSV of image pairs (paths or image ids) a person declared not duplicates: never grouped.
    not_duplicates: str | None = None
    # New images only (pipeline.stages.incremental): auto = when the result equals a full
    # rebuild (exact index), always = also with an approximate index, never = full every time.
    incremental: str = "auto"
    incremental_max_new: int = 10_000  # more new images than this: full dedup
    # Up to this many images the pairs, lists, groups and incremental state are made on the
    # driver from the search's collected kNN rows (pipeline.core.pairs); above (or 0), in Spark.
    driver_max_images: int = 20_000


@dataclass
class QuerySettings:
    # `neardup query`: new images checked against an existing archive's workdir.
    input: list[str] = field(default_factory=list)
    # Up to this many files: no Spark (model + index loaded in this process); above: Spark.
    max_light_files: int = 200
    force_path: str = "auto"  # auto | light | spark


@dataclass
class ReportSettings:
    # Folder of the static HTML report (default <workdir>/report).
    out: str | None = None
    groups_per_page: int = 50
    thumb_px: int = 160  # longest thumbnail side
    thumb_quality: int = 80


@dataclass
class ApplySettings:
    mode: str = "report"  # report | move | hardlink | symlink
    # move: the quarantine folder (relative paths kept under it); journals and plans go here too.
    target: str | None = None
    execute: bool = False  # false: dry run (plan only)
    undo: str | None = None  # a journal to roll back instead


@dataclass
class TrainSettings:
    # Image folders to learn the post-processing from: must not be the collection you search.
    input: list[str] = field(default_factory=list)
    name: str = "whitening"
    # PCA-whitening: output dimension (null: keep all), eigenvalue power (0.5 full whitening,
    # 0 centring + rotation only), covariance shrinkage towards the mean eigenvalue.
    dim: int | None = None
    power: float = 0.0
    shrinkage: float = 0.0
    # Where the artifact goes (default <workdir>/postprocess/<name>-<version>.npz).
    output: str | None = None
    # Optional projection head (issue 3) after the whitening: a linear map to head_dim
    # (0 = off) trained with an InfoNCE loss on augmented views of the training images
    # (frozen backbone); head_augmentations views per image, seeded by train.head_seed.
    head_dim: int = 0
    head_epochs: int = 10
    head_temperature: float = 0.1
    head_augmentations: int = 2
    head_seed: int = 0


@dataclass
class EvaluateSettings:
    dataset: str = "ukbench"
    input: str | None = None
    backbones: list[str] = field(default_factory=lambda: ["mobilenet"])
    json_out: str | None = None
    # Learn embed.postprocess first with the train job on this OTHER collection (a folder).
    train_input: str | None = None
    # dataset "mixed": these labelled folders are searched together with `input` as ONE
    # collection (ground truth merged); pair precision/recall only.
    mixed_with: list[str] = field(default_factory=list)


@dataclass
class ClassicalSettings:
    """Classical methods (pipeline.core.classical): where their trained vocabularies come from."""

    # method -> trained artifact (.npz, local path or URI); wins over training.
    artifacts: dict[str, Any] = field(default_factory=dict)
    # Image folders to train vocabularies on when no artifact is given; never the evaluated set.
    train_input: list[str] = field(default_factory=list)
    # method -> option overrides of the registry defaults, e.g. {vlad-ssr: {k: 16}}.
    options: dict[str, Any] = field(default_factory=dict)
    max_descriptors: int = 200_000
    seed: int = 0
    niter: int = 20
    # Earlier evaluate JSON outputs (other datasets) merged into one study table.
    compare_with: list[str] = field(default_factory=list)


@dataclass
class MlflowSettings:
    # None: a sqlite store inside the workdir (the embedded default).
    tracking_uri: str | None = None
    experiment: str = "neardup"


@dataclass
class Config:
    workdir: str = "work"
    spark: SparkSettings = field(default_factory=SparkSettings)
    ingest: IngestSettings = field(default_factory=IngestSettings)
    embed: EmbedSettings = field(default_factory=EmbedSettings)
    index: IndexSettings = field(default_factory=IndexSettings)
    dedup: DedupSettings = field(default_factory=DedupSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    evaluate: EvaluateSettings = field(default_factory=EvaluateSettings)
    classical: ClassicalSettings = field(default_factory=ClassicalSettings)
    mlflow: MlflowSettings = field(default_factory=MlflowSettings)
    report: ReportSettings = field(default_factory=ReportSettings)
    apply: ApplySettings = field(default_factory=ApplySettings)
    query: QuerySettings = field(default_factory=QuerySettings)
    max_error_fraction: float = 0.05
    # Per-stage progress bars: auto (only on a terminal) | always | never.
    progress: str = "auto"

    # ------------------------------------------------------------------ build
    @classmethod
    def load(cls, path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> "Config":
        """Read YAML ``path`` (default ``conf/default.yaml``) and apply ``key.sub=value`` overrides."""
        conf_path = Path(path) if path else DEFAULT_CONF_PATH
        raw: dict[str, Any] = {}
        if conf_path.exists():
            with open(conf_path, encoding="utf-8") as fh:
                raw = yaml.safe_load(fh) or {}
        elif path:
            raise ConfigError(f"config file not found: {conf_path}")
        for item in overrides:
            key, value = parse_override(item)
            set_dotted(raw, key, value)
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "Config":
        return _build(cls, raw, prefix="")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_overrides(self, **dotted: Any) -> "Config":
        """A copy with ``section__key=value`` style overrides (for code, not users)."""
        raw = self.to_dict()
        for key, value in dotted.items():
            set_dotted(raw, key.replace("__", "."), value)
        return Config.from_dict(raw)

    # --------------------------------------------------------------- validate
    def validate(self) -> "Config":
        """Raise :class:`ConfigError` naming the first bad value; return self when all is well.

        Only the settings themselves are checked here; what depends on the encoder (backbone
        name, weights and model files, classical options) is checked by
        :func:`pipeline.api.preflight`, which calls this first.
        """
        if not self.workdir:
            raise ConfigError("workdir must be set")
        if not 0.0 <= self.max_error_fraction <= 1.0:
            raise ConfigError(f"max_error_fraction must be in [0, 1], got {self.max_error_fraction!r}")
        validate_pair_score(self)
        if self.dedup.k < 1:
            raise ConfigError(f"dedup.k must be >= 1, got {self.dedup.k!r}")
        if self.index.type not in INDEX_TYPES:
            raise ConfigError(f"index.type must be one of {', '.join(INDEX_TYPES)}, got {self.index.type!r}")
        if self.index.shards < 0:
            raise ConfigError(f"index.shards must be >= 0 (0: derived from index.max_memory), got {self.index.shards!r}")
        try:
            budget = parse_memory(self.index.max_memory)
        except ValueError as exc:
            raise ConfigError(f"index.max_memory: {exc}") from exc
        if budget < 16 * 1024 * 1024:
            raise ConfigError(f"index.max_memory must be at least 16m, got {self.index.max_memory!r}")
        if self.index.sq_type not in ("fp16", "8bit"):
            raise ConfigError(f"index.sq_type must be fp16 or 8bit, got {self.index.sq_type!r}")
        if self.index.nprobe < 0 or self.index.query_block < 1 or self.index.train_sample < 0:
            raise ConfigError("index.nprobe must be >= 0 (0: from the list count), index.query_block >= 1, index.train_sample >= 0; got "
                              f"{self.index.nprobe!r}, {self.index.query_block!r}, {self.index.train_sample!r}")
        if self.index.use_gpu not in ("auto", "never", "always"):
            raise ConfigError(f"index.use_gpu must be auto, never or always, got {self.index.use_gpu!r}")
        if self.embed.batch_size < 1:
            raise ConfigError(f"embed.batch_size must be >= 1, got {self.embed.batch_size!r}")
        if self.ingest.max_pixels < 1:
            raise ConfigError(f"ingest.max_pixels must be >= 1, got {self.ingest.max_pixels!r}")
        if self.ingest.max_shard_bytes < 1024:
            raise ConfigError(f"ingest.max_shard_bytes must be >= 1024, got {self.ingest.max_shard_bytes!r}")
        validate_descriptor_options(self)
        if self.dedup.hamming_bits is not None and not 0 <= self.dedup.hamming_bits <= 64:
            raise ConfigError(f"dedup.hamming_bits must be in [0, 64], got {self.dedup.hamming_bits!r}")
        validate_review_options(self)
        if self.evaluate.dataset not in ("ukbench", "holidays", "mixed"):
            raise ConfigError(f"evaluate.dataset must be ukbench, holidays or mixed, got {self.evaluate.dataset!r}")
        if self.evaluate.mixed_with and self.evaluate.dataset != "mixed":
            raise ConfigError("evaluate.mixed_with needs evaluate.dataset=mixed")
        return self

    # ------------------------------------------------------------- derived
    def tracking_uri(self) -> str:
        if self.mlflow.tracking_uri:
            return self.mlflow.tracking_uri
        local = local_path_of(self.workdir)
        if local is None:
            raise ConfigError(
                "mlflow.tracking_uri must be set when workdir is not on the local filesystem "
                f"(workdir={self.workdir!r}); use a tracking server or a sqlite file on local disk"
            )
        return "sqlite:///" + str(Path(local).resolve() / "mlflow.db")
