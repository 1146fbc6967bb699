"""The prompted ViT: exactness against timm and independent VPT forwards, gates, relocation, state."""

import math
import pytest
import timm
import torch
import torch.nn.functional as F

from provpt.config import METHODS, RELOCATING, RunConfig
from provpt.model.backbone import WeightsError, create_backbone, save_backbone
from provpt.model.methods import build_model, count_parameters, trainable_parameters
from provpt.model.prompted_vit import PromptedViT, shallow_distribution

KW = dict(img_size=16, patch_size=8, embed_dim=32, depth=3, num_heads=2)
NAME = "vit_tiny_patch16_224"


def tiny_vit(**extra):
    torch.manual_seed(0)
    return timm.create_model(NAME, num_classes=0, **KW, **extra).eval()


def x_batch(n=4, seed=1):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def reference_forward(vit, head, block_prompts, shallow=False):
    """VPT written out independently: explicit per-block parameter lists, no prompt bank."""
    def fwd(x):
        x = vit._pos_embed(vit.patch_embed(x))
        n_prev = 0
        for i, blk in enumerate(vit.blocks):
            if i == 0 or not shallow:
                p = block_prompts[i].unsqueeze(0).expand(x.shape[0], -1, -1)
                x = torch.cat([x[:, :1], p, x[:, 1 + n_prev:]], dim=1)
                n_prev = p.shape[1]
            x = blk(x)
        return head(vit.norm(x)[:, 0])
    return fwd


def test_zero_prompts_reproduce_timm_logits_exactly():
    plain = timm.create_model(NAME, num_classes=5, **KW).eval()
    model = PromptedViT(tiny_vit(), 5)
    model.vit.load_state_dict({k: v for k, v in plain.state_dict().items() if not k.startswith("head.")})
    model.head.load_state_dict(plain.head.state_dict())
    model.eval()
    x = x_batch()
    assert torch.equal(model(x), plain(x))


@pytest.mark.parametrize("dist", [[2, 2, 2], [0, 5, 1], [3, 0, 0]])
def test_distribution_matches_independent_vpt_deep(dist):
    model = PromptedViT(tiny_vit(), 4, dist).eval()
    per_block = [model.prompts.values[model.prompts.block == i] for i in range(3)]
    ref = reference_forward(model.vit, model.head, per_block)
    x = x_batch()
    torch.testing.assert_close(model(x), ref(x), rtol=0, atol=1e-6)


def test_vpt_shallow_keeps_prompts_through_depth():
    model = PromptedViT(tiny_vit(), 4, shallow_distribution(3, 4), shallow=True).eval()
    ref = reference_forward(model.vit, model.head, [model.prompts.values, None, None], shallow=True)
    x = x_batch()
    torch.testing.assert_close(model(x), ref(x), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="shallow"):
        PromptedViT(tiny_vit(), 4, [2, 2, 0], shallow=True)


def test_gate_gradient_is_finite_difference_and_g_dot_p():
    model = PromptedViT(tiny_vit(), 4, [2, 1, 2]).double().eval()
    x, y = x_batch().double(), torch.tensor([0, 1, 2, 3])
    loss = F.cross_entropy(model(x), y)
    g_gate, g_val = torch.autograd.grad(loss, [model.prompts.gates, model.prompts.values])
    torch.testing.assert_close(g_gate, (g_val * model.prompts.values).sum(-1))
    eps = 1e-6
    for k in range(model.prompts.total):
        with torch.no_grad():
            model.prompts.gates[k] += eps
            up = F.cross_entropy(model(x), y)
            model.prompts.gates[k] -= 2 * eps
            down = F.cross_entropy(model(x), y)
            model.prompts.gates[k] += eps
        assert abs((up - down).item() / (2 * eps) - g_gate[k].item()) < 1e-6


def test_relocation_keeps_total_scales_value_and_optimiser_still_updates():
    model = PromptedViT(tiny_vit(), 4, [2, 2, 2])
    opt = torch.optim.SGD([p for _, p in trainable_parameters(model)], lr=0.1, momentum=0.9)
    x, y = x_batch(), torch.tensor([0, 1, 2, 3])
    F.cross_entropy(model(x), y).backward()
    opt.step()
    k, before = 1, model.prompts.values[1].detach().clone()
    momentum = opt.state[model.prompts.values]["momentum_buffer"][k].clone()
    model.prompts.move(k, 2, scale=1e-3)
    assert model.distribution() == [1, 2, 3] and model.prompts.total == 6
    torch.testing.assert_close(model.prompts.values[k], before * 1e-3)
    assert model.prompts.block_indices(2)[-1].item() == k  # appended after block 2's prompts
    assert torch.equal(opt.state[model.prompts.values]["momentum_buffer"][k], momentum)  # momentum kept
    opt.zero_grad()
    moved = model.prompts.values[k].detach().clone()
    F.cross_entropy(model(x), y).backward()
    assert model.prompts.values.grad[k].abs().sum() > 0
    opt.step()
    assert not torch.equal(model.prompts.values[k], moved)


def test_removed_takes_prompt_out_of_sequence():
    model = PromptedViT(tiny_vit(), 4, [2, 1, 1]).eval()
    x = x_batch()
    with model.prompts.removed(2):
        out = model(x)
        assert model.prompts.block_indices(1).numel() == 0
    ref = reference_forward(model.vit, model.head, [model.prompts.values[:2], model.prompts.values[:0],
                                                    model.prompts.values[3:]])
    torch.testing.assert_close(out, ref(x), rtol=0, atol=1e-6)
    assert model.prompts.block_indices(1).tolist() == [2]


def test_trainable_state_round_trips_through_safetensors(tmp_path):
    from provpt.train import load_trainable, save_trainable

    model = PromptedViT(tiny_vit(), 4, [2, 2, 2])
    model.prompts.move(0, 2)
    for p in model.vit.parameters():
        p.requires_grad_(False)
    save_trainable(model, tmp_path / "t.safetensors")
    other = PromptedViT(tiny_vit(), 4, [2, 2, 2])
    load_trainable(other, tmp_path / "t.safetensors")
    assert other.distribution() == model.distribution()
    for k, v in model.trainable_state().items():
        assert torch.equal(v, other.trainable_state()[k]), k
    x = x_batch()
    assert torch.equal(model.eval()(x), other.eval()(x))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_backbone_loads_local_weights(tmp_path, suffix):
    src = tiny_vit()
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_backbone(src, path)
    else:
        torch.save({"model": src.state_dict()}, path)
    vit = create_backbone(NAME, path, **KW)
    for k, v in src.state_dict().items():
        assert torch.equal(v, vit.state_dict()[k])


def test_backbone_errors_name_the_problem(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        create_backbone(NAME, tmp_path / "missing.npz", **KW)
    torch.save(tiny_vit().state_dict(), tmp_path / "w.pth")
    with pytest.raises(WeightsError, match="do not fit"):
        create_backbone(NAME, tmp_path / "w.pth", **{**KW, "depth": 2})
    with pytest.raises(WeightsError, match="shape mismatch"):
        create_backbone(NAME, tmp_path / "w.pth", **{**KW, "embed_dim": 64})


METHOD_CFG = dict(backbone=NAME, backbone_kwargs=KW, num_prompts=2, prompt_dropout=0.0)


@pytest.mark.parametrize("method", METHODS)
def test_methods_train_the_right_parameters(method):
    cfg = RunConfig(method=method, **METHOD_CFG)
    torch.manual_seed(0)
    model = build_model(cfg, 5)
    names = [n for n, _ in trainable_parameters(model)]
    counts = count_parameters(model)
    assert "head.weight" in names and "prompts.gates" not in names
    expected_prompts = {"vpt-shallow": 2, "vpt-deep": 6, **dict.fromkeys(RELOCATING, 6)}.get(method, 0)
    assert model.prompts.total == expected_prompts
    backbone = [n for n in names if n.startswith("vit.")]
    if method == "full":
        assert len(backbone) == len(list(model.vit.parameters()))
    elif method == "lora":
        assert backbone and all("lora_" in n for n in backbone)
        assert any("attn.qkv" in n for n in backbone) and not any("mlp" in n for n in backbone)
    elif method == "adapter":
        assert backbone and all(".down." in n or ".up." in n for n in backbone)
    else:
        assert not backbone
    assert counts["trainable_params"] == sum(p.numel() for _, p in trainable_parameters(model))
    # LoRA and adapters start as the identity: same logits as the linear probe with the same head
    if method in ("lora", "adapter"):
        torch.manual_seed(0)
        lin = build_model(RunConfig(method="linear", **METHOD_CFG), 5)
        lin.head.load_state_dict(model.head.state_dict())
        x = x_batch()
        torch.testing.assert_close(model.eval()(x), lin.eval()(x))


def to_google_npz(vit, path):
    """Write a timm ViT as Google's original ViT .npz layout (the inverse of timm's _load_weights)."""
    import numpy as np

    sd = {k: v.detach().numpy() for k, v in vit.state_dict().items()}
    D, H = vit.embed_dim, vit.blocks[0].attn.num_heads
    w = {"embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
         "embedding/bias": sd["patch_embed.proj.bias"], "cls": sd["cls_token"],
         "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
         "Transformer/encoder_norm/scale": sd["norm.weight"], "Transformer/encoder_norm/bias": sd["norm.bias"]}
    for i in range(len(vit.blocks)):
        b, g = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        a = g + "MultiHeadDotProductAttention_1/"
        for j, n in enumerate(("query", "key", "value")):
            w[a + n + "/kernel"] = sd[b + "attn.qkv.weight"][j * D:(j + 1) * D].T.reshape(D, H, D // H)
            w[a + n + "/bias"] = sd[b + "attn.qkv.bias"][j * D:(j + 1) * D].reshape(H, D // H)
        w[a + "out/kernel"] = sd[b + "attn.proj.weight"].reshape(D, H, D // H).transpose(1, 2, 0)
        w[a + "out/bias"] = sd[b + "attn.proj.bias"]
        for ln, name in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            w[g + ln + "/scale"], w[g + ln + "/bias"] = sd[b + name + ".weight"], sd[b + name + ".bias"]
        for r in range(2):
            w[g + f"MlpBlock_3/Dense_{r}/kernel"] = sd[b + f"mlp.fc{r + 1}.weight"].T
            w[g + f"MlpBlock_3/Dense_{r}/bias"] = sd[b + f"mlp.fc{r + 1}.bias"]
    np.savez(path, **w)


def test_backbone_loads_google_npz_through_timm(tmp_path):
    src = tiny_vit()
    to_google_npz(src, tmp_path / "ViT.npz")
    vit = create_backbone(NAME, tmp_path / "ViT.npz", **KW)
    for k, v in src.state_dict().items():
        torch.testing.assert_close(vit.state_dict()[k], v, rtol=0, atol=1e-6, msg=k)


def test_vpt_head_init_is_kaiming_fan_out_with_prior_bias():
    torch.manual_seed(0)
    default = build_model(RunConfig(method="vpt-deep", **METHOD_CFG), 400).head
    torch.manual_seed(0)
    vpt = build_model(RunConfig(method="vpt-deep", head_init="vpt", **METHOD_CFG), 400).head
    assert torch.allclose(vpt.bias, torch.full((400,), -math.log(99.0)))
    # kaiming-normal fan-out: std sqrt(2 / out_features); torch's default is uniform with std ~ 1/sqrt(3 in)
    assert abs(vpt.weight.std().item() / math.sqrt(2 / 400) - 1) < 0.05
    assert abs(default.weight.std().item() - vpt.weight.std().item()) > 0.02
    with pytest.raises(Exception, match="head_init"):
        RunConfig.from_dict({"head_init": "xavier"})
