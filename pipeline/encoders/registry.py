"""The one place that decides what an ``embed.backbone`` name means.

A name is a classical method of :data:`pipeline.core.classical.CLASSICAL_METHODS` (its family
picks the encoder class), a path to a ``.keras`` model file, or a ``keras.applications``
backbone of :data:`pipeline.encoders.backbones.REGISTRY`. To add an encoder: write its class
(one file, an :class:`~pipeline.encoders.base.Encoder`) and add one line here.
"""
from __future__ import annotations

from typing import Iterable

from pipeline.config import Config
from pipeline.core import classical
from pipeline.encoders import backbones
from pipeline.encoders.base import Encoder
from pipeline.encoders import classical as classical_encoders
from pipeline.encoders.classical import BowEncoder, FisherEncoder, HashEncoder, VladEncoder
from pipeline.encoders.cnn import CnnEncoder, ModelFileEncoder

# Classical family -> encoder class.
CLASSICAL_FAMILIES: dict[str, type[Encoder]] = {
    "hash": HashEncoder,
    "bow": BowEncoder,
    "vlad": VladEncoder,
    "fisher": FisherEncoder,
}
#: ``evaluate --backbones all`` / ``--methods all-classical``.
ALL_BACKBONES = "all"
ALL_CLASSICAL = classical.ALL_CLASSICAL


def encoder_class(name: str) -> type[Encoder]:
    """The encoder class for an ``embed.backbone`` name."""
    spec = classical.CLASSICAL_METHODS.get(name)
    if spec is not None:
        return CLASSICAL_FAMILIES[spec.family]
    if name.endswith(".keras"):
        return ModelFileEncoder
    return CnnEncoder


def encoder_for(config: Config) -> Encoder:
    """The encoder ``config.embed.backbone`` names (cheap: nothing is loaded)."""
    return encoder_class(config.embed.backbone)(config)


def expand_names(names: Iterable[str]) -> list[str]:
    """``all`` -> every registry backbone, ``all-classical`` -> every classical method; repeats dropped."""
    out: list[str] = []
    for name in names:
        if name == ALL_BACKBONES:
            expanded = list(backbones.REGISTRY)
        elif name == ALL_CLASSICAL:
            expanded = list(classical.CLASSICAL_METHODS)
        else:
            expanded = [name]
        out.extend(n for n in expanded if n not in out)
    return out


def validate_settings(config: Config) -> None:
    """Cheap checks of the encoder settings sections, whichever encoder the config names."""
    classical_encoders.validate_section(config)
    encoder_for(config).validate()
