"""A timm Vision Transformer by name, with weights from a local file only (never the network)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import timm
from torch import nn

from ..io import save_safetensors
from .prompted_vit import check_backbone

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a stray pretrained=True must fail, not download

WEIGHT_SUFFIXES = (".npz", ".safetensors", ".pth", ".pt", ".bin")


class WeightsError(ValueError):
    """A weight file that is missing, of an unknown kind, or whose keys do not fit the model."""


def create_backbone(name: str, weights: str | os.PathLike | None = None, **kwargs) -> nn.Module:
    """``timm.create_model(name, **kwargs)`` without a classifier head, weights from ``weights``.

    The model must be a family :class:`~provpt.model.prompted_vit.PromptedViT` runs
    (:func:`~provpt.model.prompted_vit.check_backbone`: timm's VisionTransformer, its distilled
    variant, Eva); any other is refused with one sentence naming the model, before weights load.

    ``weights`` may be Google's ``.npz`` (loaded by timm's own ``load_pretrained``), a
    ``.safetensors`` file or a ``.pth``/``.pt`` state dict (loaded with ``weights_only=True``, then
    adapted by timm's own checkpoint filter, :func:`timm_filter`). Keys of a classifier head in the
    file are ignored; any other mismatch is an error naming the first missing or unexpected key. Without
    ``weights`` the random initialisation has a fixed seed (torch's global RNG untouched): every run,
    alone or sharing it in a pack, gets the same backbone.
    """
    kwargs = {"num_classes": 0, **kwargs}
    if weights is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = timm.create_model(name, pretrained=False, **kwargs)
    else:
        path = Path(weights)
        if not path.is_file():
            raise WeightsError(f"backbone weights: file not found: {path}")
        if path.suffix not in WEIGHT_SUFFIXES:
            raise WeightsError(f"backbone weights {path}: unknown format, expected one of {WEIGHT_SUFFIXES}")
        if path.suffix == ".npz":
            try:
                model = timm.create_model(
                    name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path), custom_load=True), **kwargs
                )
            except (KeyError, RuntimeError, ValueError) as e:
                raise WeightsError(f"backbone weights {path}: does not fit {name}: {e}") from None
        else:
            model = timm.create_model(name, pretrained=False, **kwargs)
            check_backbone(model)
            load_state_dict_file(model, path)
    check_backbone(model)
    return model


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise WeightsError(f"backbone weights {path}: expected a state dict, got {type(sd).__name__}")
    return sd


CLASSIFIER = ("head.", "head_dist.")  # timm's classifier (and DeiT's distillation classifier) keys


def timm_filter(model: torch.nn.Module, sd: dict) -> dict:
    """The state dict as timm's own ``checkpoint_filter_fn`` of the model's module adapts it when
    timm loads pretrained weights: original layouts (DINOv2, OpenAI CLIP, EVA) converted, position
    embeddings resampled to the model's grid (e.g. DINOv2's 518 px weights at 224 px). A file the
    filter cannot read is left as it is, for the key check to name what does not fit."""
    fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if fn is None:
        return sd
    try:
        return fn(dict(sd), model)
    except (KeyError, RuntimeError, ValueError, TypeError, AttributeError, IndexError):
        return sd


def load_state_dict_file(model: torch.nn.Module, path: Path) -> None:
    sd = {k.removeprefix("module."): v for k, v in read_state_dict(path).items()}
    sd = {k: v for k, v in timm_filter(model, sd).items() if not k.startswith(CLASSIFIER)}
    own = model.state_dict()
    missing = [k for k in own if k not in sd]  # in the model's order: the first is the first that fails
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__
        parts = []
        if missing:
            parts.append(f"first missing key {missing[0]!r} ({len(missing)} missing)")
        if unexpected:
            parts.append(f"first unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected)")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} shape mismatch(es), first {k}: file {tuple(sd[k].shape)} vs model "
                         f"{tuple(own[k].shape)}")
        raise WeightsError(f"backbone weights {path}: keys do not fit {name}: " + "; ".join(parts))
    model.load_state_dict(sd)


def save_backbone(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Save a backbone's weights (no head) as safetensors, atomically."""
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if not k.startswith(CLASSIFIER)}
    save_safetensors(sd, path)
