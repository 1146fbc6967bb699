"""Models: timm backbone from local weights, prompt bank, prompted ViT, method builder."""

from .prompts import PromptBank, vpt_init_range
from .prompted_vit import PromptedViT, shallow_distribution, uniform_distribution

__all__ = ["PromptBank", "PromptedViT", "shallow_distribution", "uniform_distribution", "vpt_init_range"]
