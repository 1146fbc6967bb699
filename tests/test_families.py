"""Prompt tuning over timm's ViT families, in timm's style: one list of model names at tiny sizes
(random init, depth 2, width 64, 32 px, float64), each checked against timm's own forward."""

import math

import pytest
import timm
import torch
import torch.nn.functional as F

from provpt.model.backbone import create_backbone
from provpt.model.methods import trainable_parameters
from provpt.model.prompted_vit import PromptedViT, UnsupportedBackbone, packed_forward, rope_with_prompts

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(depth=2, embed_dim=64, num_heads=2, img_size=32)
FAMILIES = {  # timm name -> patch size at 32 px
    "vit_base_patch16_224": 16,  # class token, token pooling
    "vit_medium_patch16_gap_256": 8,  # no class token, avg pooling
    "vit_base_patch14_reg4_dinov2": 8,  # class + 4 register tokens
    "vit_base_patch16_clip_224": 8,  # norm_pre
    "deit3_base_patch16_224": 8,  # layer scale, no_embed_class
    "vit_base_patch16_siglip_224": 8,  # map (attention pool) head, no class token
    "deit_base_distilled_patch16_224": 8,  # class + distillation token, two heads
    "eva02_base_patch14_224": 8,  # Eva: RoPE, SwiGLU
    "vit_base_patch16_rope_reg1_gap_256": 8,  # Eva: RoPE, a register token, avg pooling
    "vit_base_patch16_rope_mixed_224": 8,  # Eva: per-block (mixed) RoPE
}
REFUSED = {"beit_base_patch16_224": "relative position bias"}


def kwargs(name):
    return dict(TINY, patch_size=FAMILIES.get(name, 16))


def backbone(name, seed=0):
    """A tiny timm model of ``name``, every parameter moved off its init (layer scale 1e-6, zero
    biases), so that each part of the forward matters."""
    vit = create_backbone(name, **kwargs(name)).double().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    vit.requires_grad_(False)
    return vit


def images(n=3, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def prompted(name, dist=(2, 3), seed=0, log_gated=False, shallow=False, vit=None):
    torch.manual_seed(seed)
    model = PromptedViT(vit if vit is not None else backbone(name), 5, list(dist), shallow=shallow, seed=seed)
    model = model.double().eval()
    with torch.no_grad():
        model.prompts.values.normal_(0, 0.5)
    model.prompts.log_gated = log_gated
    return model


@pytest.mark.parametrize("name", list(FAMILIES))
def test_zero_prompts_give_timms_logits(name):
    vit = backbone(name)
    plain = timm.create_model(name, num_classes=5, **kwargs(name)).double().eval()
    plain.load_state_dict({**plain.state_dict(), **vit.state_dict()}, strict=True)
    model = PromptedViT(vit, 5).double().eval()
    model.head.load_state_dict(plain.head.state_dict())
    if hasattr(plain, "head_dist"):  # distilled: one head replaces both; timm's logits when they agree
        plain.head_dist.load_state_dict(plain.head.state_dict())
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), rtol=0, atol=1e-10)
        assert model.features(x).shape == (3, 64)


@pytest.mark.parametrize("shallow", [False, True], ids=["deep", "shallow"])
@pytest.mark.parametrize("name", list(FAMILIES))
@torch.no_grad()
def test_minus_inf_log_gate_equals_the_prompt_removed(name, shallow):
    model = prompted(name, (5, 0) if shallow else (2, 3), log_gated=True, shallow=shallow)
    bank, x = model.prompts, images()
    for k in range(bank.total):
        with bank.removed(k):
            removed = model(x)
        bank.log_gates[k] = -math.inf
        gated = model(x)
        bank.log_gates[k] = 0.0
        torch.testing.assert_close(gated, removed, rtol=0, atol=1e-10)
        assert (gated - model(x)).abs().max() > 1e-6, k  # the prompt did matter
    with bank.removed(*range(bank.total)):
        none = model.features(x)
    torch.testing.assert_close(none, PromptedViT(model.vit, 5).double().eval().features(x), rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_relocation_keeps_the_optimiser_state(name):
    model = prompted(name)
    opt = torch.optim.SGD([p for _, p in trainable_parameters(model)], lr=0.1, momentum=0.9)
    x, y = images(4), torch.tensor([0, 1, 2, 3])
    F.cross_entropy(model(x), y).backward()
    opt.step()
    k = 0
    momentum = opt.state[model.prompts.values]["momentum_buffer"][k].clone()
    model.prompts.move(k, 1)
    assert model.distribution() == [1, 4]
    assert model.prompts.block_indices(1)[-1].item() == k
    assert torch.equal(opt.state[model.prompts.values]["momentum_buffer"][k], momentum)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    assert model.prompts.values.grad[k].abs().sum() > 0  # the moved prompt acts in its new block
    before = model.prompts.values[k].detach().clone()
    opt.step()
    assert not torch.equal(model.prompts.values[k], before)


@pytest.mark.parametrize("name", list(FAMILIES))
@torch.no_grad()
def test_a_packed_forward_equals_each_run_alone(name):
    vit = backbone(name)
    runs = [prompted(name, (2, 3), seed=1, vit=vit), prompted(name, (0, 4), seed=2, vit=vit, log_gated=True)]
    runs[1].prompts.log_gates.copy_(torch.linspace(-2, 1, 4, dtype=torch.float64))
    xs = [images(3, seed=10), images(2, seed=11)]
    packed = packed_forward(runs, torch.cat(xs), [3, 2])
    for run, x, p in zip(runs, xs, packed):
        torch.testing.assert_close(p, run(x), rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------- RoPE


@pytest.mark.parametrize("name", [n for n in FAMILIES if n.startswith(("eva", "vit_base_patch16_rope"))])
@torch.no_grad()
def test_rope_prompts_are_prefix_tokens_to_timm(name):
    """Against timm's own treatment of prefix tokens: block i run by a model built with
    num_reg_tokens raised by block i's prompt count (its attention skips that many tokens before
    rotating), on the same weights. Prompts get no rotary position; patches keep theirs."""
    model = prompted(name)
    vit, x = model.vit, images()
    reg = vit.reg_token.shape[1] if vit.reg_token is not None else 0
    prefix = vit.num_prefix_tokens
    tokens, rope = vit._pos_embed(vit.patch_embed(x))
    tokens = vit.norm_pre(tokens)
    n_prev = 0
    for i, blk in enumerate(vit.blocks):
        p = model.prompts.values[model.prompts.block_indices(i)].expand(x.shape[0], -1, -1)
        tokens = torch.cat([tokens[:, :prefix], p, tokens[:, prefix + n_prev:]], dim=1)
        n_prev = p.shape[1]
        ref = timm.create_model(name, num_classes=0, num_reg_tokens=reg + n_prev, **kwargs(name)).double().eval()
        ref.blocks[i].load_state_dict(blk.state_dict())
        tokens = ref.blocks[i](tokens, rope=rope[i] if vit.rope_mixed else rope)
    tokens = vit.norm(tokens)
    feats = vit.pool(torch.cat([tokens[:, :prefix], tokens[:, prefix + n_prev:]], dim=1))
    torch.testing.assert_close(model.features(x), feats, rtol=0, atol=1e-10)


def test_rope_with_prompts_prepends_the_identity_rotation():
    rope = torch.randn(2, 6, 8)  # (heads, tokens, sin | cos)
    out = rope_with_prompts(rope, 3)
    assert out.shape == (2, 9, 8) and torch.equal(out[:, 3:], rope)
    assert torch.equal(out[:, :3, :4], torch.zeros(2, 3, 4)) and torch.equal(out[:, :3, 4:], torch.ones(2, 3, 4))
    assert rope_with_prompts(rope, 0) is rope and rope_with_prompts(None, 3) is None


# ----------------------------------------------------------------------------- refused


@pytest.mark.parametrize("name,reason", list(REFUSED.items()))
def test_refused_families_fail_at_build_with_one_sentence(name, reason):
    with pytest.raises(UnsupportedBackbone, match=rf"^backbone {name} \(\w+\) cannot take prompts: .*{reason}.*; "
                                                    r"supported: timm's VisionTransformer .* and Eva") as e:
        create_backbone(name, **kwargs(name))
    assert "\n" not in str(e.value)
    with pytest.raises(UnsupportedBackbone, match=reason):  # a timm model wrapped directly, as well
        PromptedViT(timm.create_model(name, num_classes=0, **kwargs(name)), 5)


def test_a_pool_that_gives_no_feature_vector_is_refused():
    with pytest.raises(UnsupportedBackbone, match=r"vit_base_patch16_224 .*global_pool=''.*supported"):
        create_backbone("vit_base_patch16_224", global_pool="", **kwargs("vit_base_patch16_224"))
    with pytest.raises(UnsupportedBackbone, match=r"resnet10t \(ResNet\) cannot take prompts: it is a ResNet"):
        create_backbone("resnet10t")
    with pytest.raises(UnsupportedBackbone, match=r"deit_base_distilled_patch16_224 .*distilled ViT with fc_norm"):
        create_backbone("deit_base_distilled_patch16_224", fc_norm=True, **kwargs("deit_base_distilled_patch16_224"))


# ----------------------------------------------------------------------------- depth is not 12


def test_pro_vpt_on_a_24_block_backbone_and_its_distribution_figure(toy_root, tmp_path):
    """State, action space, checkpoints and figures follow the backbone's depth (ViT-L/16: 24)."""
    import json

    import pandas as pd

    from provpt.config import RunConfig
    from provpt.report.figures import distribution_over_epochs, final_distributions
    from provpt.report.runs import load_distributions
    from provpt.train import run

    cfg = RunConfig.from_dict(dict(
        dataset="toy", data_root=str(toy_root), backbone="eva02_base_patch14_224", method="pro-vpt",
        backbone_kwargs=dict(img_size=16, patch_size=8, embed_dim=32, depth=24, num_heads=2),
        num_prompts=1, epochs=3, batch_size=16, lr=1.0, eval_splits=["val200"], progress=False, threads=1,
        precision="fp64", out=str(tmp_path / "run")))
    metrics = run(cfg)
    assert len(metrics["distribution"]) == 24 and sum(metrics["distribution"]) == 24
    moves = [json.loads(line) for line in (tmp_path / "run" / "moves.jsonl").read_text().splitlines()]
    assert moves and all(0 <= m["source"] < 24 and 0 <= m["target"] < 24 for m in moves)
    assert metrics["distribution"] != [1] * 24
    runs = pd.DataFrame([dict(path=str(tmp_path / "run"), dataset="toy", method="pro-vpt", seed=0)])
    dist = load_distributions(runs)
    assert sorted(dist["block"].unique()) == list(range(24))
    fig = distribution_over_epochs(dist, "toy")
    assert list(fig.axes[0].get_yticks()) == list(range(24))
    fig.savefig(tmp_path / "dist.png")
    final = pd.DataFrame([metrics["distribution"]], index=["toy"])
    assert len(final_distributions(final).axes[0].get_xticks()) == 24


# ----------------------------------------------------------------------------- weight files


@pytest.mark.parametrize("name", list(FAMILIES))
def test_weights_of_each_family_round_trip_through_safetensors(tmp_path, name):
    from provpt.model.backbone import save_backbone

    src = backbone(name).float()
    save_backbone(src, tmp_path / "w.safetensors")
    vit = create_backbone(name, tmp_path / "w.safetensors", **kwargs(name))
    own = vit.state_dict()
    assert set(own) == set(src.state_dict())
    for k, v in src.state_dict().items():
        assert torch.equal(own[k], v), k


def test_weights_of_another_architecture_name_the_first_missing_key(tmp_path):
    from provpt.model.backbone import WeightsError, save_backbone

    save_backbone(backbone("eva02_base_patch14_224").float(), tmp_path / "eva.safetensors")
    with pytest.raises(WeightsError, match=r"eva\.safetensors: keys do not fit vit_base_patch16_clip_224: "
                                           r"first missing key 'norm_pre\.weight' \(12 missing\); "
                                           r"first unexpected key 'blocks\.0\.attn\.k_proj\.weight' \(25 unexpected\)"):
        name = "vit_base_patch16_clip_224"
        create_backbone(name, tmp_path / "eva.safetensors", **kwargs(name))


def test_weights_at_another_resolution_are_resampled_by_timm(tmp_path):
    """DINOv2's weights come at 518 px; timm's checkpoint filter resamples the position embedding to
    the model's grid (here 4 x 4 patches to 2 x 2; no_embed_class: patches only), as timm's own
    pretrained loading does."""
    from timm.layers import resample_abs_pos_embed

    from provpt.model.backbone import save_backbone

    name = "vit_base_patch14_reg4_dinov2"
    src = backbone(name).float()
    save_backbone(src, tmp_path / "w.safetensors")
    vit = create_backbone(name, tmp_path / "w.safetensors", **{**kwargs(name), "img_size": 16})
    expected = resample_abs_pos_embed(src.pos_embed, new_size=(2, 2), old_size=(4, 4), num_prefix_tokens=0)
    torch.testing.assert_close(vit.pos_embed, expected)
    assert torch.equal(vit.blocks[1].attn.qkv.weight, src.blocks[1].attn.qkv.weight)


# ----------------------------------------------------------------------------- every method


@pytest.mark.parametrize("name", ["eva02_base_patch14_224", "deit_base_distilled_patch16_224",
                                  "vit_base_patch16_siglip_224"])
def test_every_method_builds_and_trains_on_the_family(name):
    from provpt.config import METHODS, RunConfig
    from provpt.model.methods import build_model

    x, y = images(4).float(), torch.tensor([0, 1, 2, 3])
    for method in METHODS:
        cfg = RunConfig(method=method, backbone=name, backbone_kwargs=kwargs(name), num_prompts=2)
        model = build_model(cfg, 5).train()
        params = [p for _, p in trainable_parameters(model)]
        F.cross_entropy(model(x), y).backward()
        assert all(p.grad is not None for p in params if p.numel()), method
        if method == "lora":  # EVA-02's separate q/k/v projections get LoRA too
            names = [n for n, _ in trainable_parameters(model)]
            assert any(".attn.q_proj.lora_" in n or ".attn.qkv.lora_" in n for n in names), names


# ----------------------------------------------------------------------------- backbone profiles


@pytest.mark.parametrize("profile", ["vtab1k-dinov2", "vtab1k-eva02"])
def test_backbone_profiles_extend_vtab1k_and_build_their_family(profile):
    """Each backbone profile is vtab1k's protocol with its own backbone, weights file, normalisation
    and input size; its backbone (at depth 2, width 64) builds and takes prompts at that input size."""
    from pathlib import Path

    from provpt.config import resolve

    params = Path(__file__).resolve().parents[1] / "params"
    cfg = resolve(params / f"{profile}.yaml", "pro-vpt", "final", ["dataset=cifar"])
    paper = resolve(params / "vtab1k.yaml", "pro-vpt", "final", ["dataset=cifar"])
    assert cfg.backbone != paper.backbone and cfg.weights != paper.weights and cfg.weights.endswith(".safetensors")
    assert (cfg.epochs, cfg.num_prompts, cfg.relocation, cfg.data_root) == (paper.epochs, paper.num_prompts,
                                                                           paper.relocation, paper.data_root)
    assert cfg.norm == {"vtab1k-dinov2": "imagenet", "vtab1k-eva02": "clip"}[profile]
    size = cfg.backbone_kwargs["img_size"]
    assert size == 224
    vit = create_backbone(cfg.backbone, **{**cfg.backbone_kwargs, "depth": 2, "embed_dim": 64, "num_heads": 2})
    model = PromptedViT(vit, 3, [2, 2]).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, size, size)).shape == (1, 3)
