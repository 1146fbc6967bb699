"""A timm VisionTransformer by name, with weights from a local file only (never the network)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import timm
from timm.models.vision_transformer import VisionTransformer

from ..io import save_safetensors

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a stray pretrained=True must fail, not download

WEIGHT_SUFFIXES = (".npz", ".safetensors", ".pth", ".pt", ".bin")


class WeightsError(ValueError):
    """A weight file that is missing, of an unknown kind, or whose keys do not fit the model."""


def create_backbone(name: str, weights: str | os.PathLike | None = None, **kwargs) -> VisionTransformer:
    """``timm.create_model(name, **kwargs)`` without a classifier head, weights from ``weights``.

    ``weights`` may be Google's ``.npz`` (loaded by timm's own ``load_pretrained``), a
    ``.safetensors`` file or a ``.pth``/``.pt`` state dict (loaded with ``weights_only=True``).
    Keys of a classifier head in the file are ignored; any other mismatch is an error. Without
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
            load_state_dict_file(model, path)
    if not isinstance(model, VisionTransformer):
        raise WeightsError(f"backbone {name!r} is a {type(model).__name__}, expected a timm VisionTransformer")
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


def load_state_dict_file(model: torch.nn.Module, path: Path) -> None:
    sd = {k.removeprefix("module."): v for k, v in read_state_dict(path).items()}
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    own = model.state_dict()
    missing = sorted(k for k in own if k not in sd)
    unexpected = sorted(k for k in sd if k not in own)
    wrong = sorted(k for k in sd if k in own and sd[k].shape != own[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s) e.g. {missing[:4]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s) e.g. {unexpected[:4]}")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} shape mismatch(es) e.g. {k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}")
        raise WeightsError(f"backbone weights {path}: keys do not fit the model: " + "; ".join(parts))
    model.load_state_dict(sd)


def save_backbone(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Save a backbone's weights (no head) as safetensors, atomically."""
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if not k.startswith("head.")}
    save_safetensors(sd, path)
