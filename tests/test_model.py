"""The SynQT model is exact: logits against an independent re-computation, gradients, freezing, counts."""

from __future__ import annotations

import re

import pytest
import timm
import torch
from model_helpers import TINY, TINY_KW, VARIANTS, images, randomize_, set_scales_
from reference_synqt import image_stream as reference_image_stream
from reference_synqt import reference_logits
from torch import nn

import synqt
from synqt.errors import ModelError
from synqt.model.branch import QueryBranch
from synqt.model.stream import expected_trainable

ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def _random_model(kw: dict, token_nums: int, seed: int = 1, num_classes: int = 7) -> synqt.SynQT:
    torch.manual_seed(seed)
    model = synqt.build_model(TINY, num_classes, token_nums=token_nums, feat_scale=0.7, attn_scale=0.3,
                              ffn_scale=1.7, **kw)
    randomize_(model, seed)
    depth = model.depth
    # non-trivial, per-block different scales (negative too: nothing may assume they are positive)
    set_scales_(model, 0.7, [0.3, -1.2, 0.5][:depth], [1.7, 0.4, 2.0][:depth])
    return model


# ---------------------------------------------------------------------------------------------------------------
# logits against the independent reference


@pytest.mark.parametrize("token_nums", [1, 3])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_eval_logits_match_independent_reference(variant: str, token_nums: int) -> None:
    model = _random_model(VARIANTS[variant], token_nums).eval()
    x = images(3)
    with torch.no_grad():
        logits = model(x)
    expected = reference_logits(synqt.to_official_state_dict(model), x, num_heads=model.num_heads)
    assert logits.shape == (3, 7)
    assert expected.abs().max() > 0.1, "degenerate reference: logits too small to compare"
    err = (logits.double() - expected).abs().max().item()
    assert err < ATOL, f"{variant}, T={token_nums}: logits differ from the spec re-computation by {err:.3g}"


def test_reference_is_sensitive_to_every_used_tensor() -> None:
    """Guards the reference itself: perturbing any official tensor (but the two unused ones) moves its logits."""
    model = _random_model(VARIANTS["layer_scale"], token_nums=3).eval()
    sd = synqt.to_official_state_dict(model)
    x = images(2)
    base = reference_logits(sd, x, num_heads=model.num_heads)
    ignored = {k for k in sd if k.startswith("synqt.pre_norm.") or k == "synqt.out_combine.weight"}
    # the final norm of the backbone is not used by the method (spec section 1)
    ignored |= {"norm.weight", "norm.bias"}
    # a bias added to every key shifts all scores of a query equally: softmax cancels it
    invariant = {k for k in sd if re.fullmatch(r"synqt\.qsm_block\.\d+\.attn\.k_proj\.mlp\.fc2\.bias", k)}
    for key, value in sd.items():
        if key in ignored or key in invariant:
            continue
        moved = dict(sd)
        moved[key] = value + 0.5 * torch.randn(value.shape, generator=torch.Generator().manual_seed(3))
        delta = (reference_logits(moved, x, num_heads=model.num_heads) - base).abs().max().item()
        assert delta > 1e-6, f"reference ignores {key}"
    for key in ignored:  # ... and the unused ones really do nothing
        moved = dict(sd)
        moved[key] = sd[key] + 1.0
        assert torch.equal(reference_logits(moved, x, num_heads=model.num_heads), base)
    # the model agrees: the backbone's final norm does not change its logits either
    with torch.no_grad():
        before = model(x)
        model.backbone.norm.weight.add_(1.0)
        assert torch.equal(model(x), before)


def test_output_shapes() -> None:
    for token_nums, classes, batch in ((1, 5, 2), (4, 11, 3)):
        torch.manual_seed(0)
        model = synqt.build_model(TINY, classes, token_nums=token_nums, **TINY_KW)
        assert model(images(batch)).shape == (batch, classes)
        model.eval()
        assert model(images(batch)).shape == (batch, classes)
        assert tuple(model.branch.queries.shape) == (TINY_KW["depth"], token_nums, TINY_KW["embed_dim"])
        stream = model.image_stream(images(batch))
        assert len(stream) == TINY_KW["depth"]
        assert all(t.shape == (batch, 1 + 16, TINY_KW["embed_dim"]) for t in stream)


# ---------------------------------------------------------------------------------------------------------------
# gradients and freezing


def _train_step_grads(model: synqt.SynQT, batch: int = 4) -> None:
    model.train()
    logits = model(images(batch, seed=5))
    target = torch.arange(batch) % logits.shape[1]
    nn.functional.cross_entropy(logits, target).backward()


@pytest.mark.parametrize("variant", ["plain", "reg_tokens", "qk_norm"])
def test_every_trainable_parameter_gets_a_finite_nonzero_gradient(variant: str) -> None:
    model = _random_model(VARIANTS[variant], token_nums=3)
    _train_step_grads(model)
    for name, param in model.named_trainable_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name} has a non-finite gradient"
        assert param.grad.abs().max() > 0, f"{name} has an all-zero gradient"
    for name, param in model.backbone.named_parameters():
        assert param.grad is None, f"frozen backbone parameter {name} got a gradient"
        assert not param.requires_grad


def test_single_query_token_leaves_only_qsm_query_key_path_without_gradient() -> None:
    """With T = 1 the QSM softmax is over one token (always 1): only LN_q, q_proj and k_proj get zero
    gradient, as in the official code; everything else must still learn."""
    model = _random_model(VARIANTS["plain"], token_nums=1)
    _train_step_grads(model)
    dead = re.compile(r"branch\.qsm_blocks\.\d+\.attn\.(q_norm|q_adapter|k_adapter)\.")
    for name, param in model.named_trainable_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        if dead.match(name):
            assert param.grad.abs().max() < 1e-12, f"{name}: softmax over one token cannot depend on q/k"
        else:
            assert param.grad.abs().max() > 0, f"{name} has an all-zero gradient"


def test_backbone_unchanged_by_adamw_steps() -> None:
    model = _random_model(VARIANTS["layer_scale"], token_nums=2)
    frozen = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    branch_before = {k: v.clone() for k, v in model.branch.state_dict().items()}
    # 1. the usual optimizer over the trainable parameters only
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        opt.zero_grad()
        _train_step_grads(model)
        opt.step()
    # 2. a careless optimizer over all parameters with weight decay: frozen ones have no grad, so are skipped
    opt_all = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5)
    opt_all.zero_grad()
    _train_step_grads(model)
    opt_all.step()
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, frozen[key]), f"backbone tensor {key} changed during training"
    changed = [k for k, v in model.branch.state_dict().items() if not torch.equal(v, branch_before[k])]
    assert len(changed) == len(branch_before), "every branch tensor should have moved after AdamW steps"


def test_train_mode_keeps_backbone_in_eval_and_image_stream_deterministic() -> None:
    torch.manual_seed(0)
    model = synqt.build_model(TINY, 5, drop_path_rate=0.5, backbone_drop_path=False, **TINY_KW)
    model.train()
    assert model.training and model.branch.training
    assert not model.backbone.training
    assert not any(m.training for m in model.backbone.modules()), "a backbone submodule left eval mode"
    x = images(4)
    first, second = model.image_stream(x), model.image_stream(x)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b), "with backbone_drop_path=False the train-mode image stream must be deterministic"
    model.eval()
    for a, b in zip(first, model.image_stream(x), strict=True):
        assert torch.equal(a, b), "with backbone_drop_path=False train and eval image streams must agree"
    model.train(False)
    assert not model.training and not model.backbone.training


def test_backbone_drop_path_makes_train_mode_stochastic() -> None:
    torch.manual_seed(0)
    model = synqt.build_model(TINY, 5, drop_path_rate=0.5, backbone_drop_path=True, **TINY_KW)
    x = images(8)
    model.train()
    assert not model.backbone.training
    s1, s2 = model.image_stream(x), model.image_stream(x)
    assert not torch.equal(s1[-1], s2[-1]), "backbone_drop_path=True: the train-mode image stream must vary"
    with torch.no_grad():
        assert not torch.equal(model(x), model(x)), "train-mode logits should vary between calls"
        model.eval()
        assert torch.equal(model(x), model(x)), "eval-mode logits must be deterministic"
    e1, e2 = model.image_stream(x), model.image_stream(x)
    assert torch.equal(e1[-1], e2[-1])


# ---------------------------------------------------------------------------------------------------------------
# which parameters are trainable, and how many


def test_trainable_set_is_exactly_named_trainable_parameters() -> None:
    model = _random_model(VARIANTS["reg_tokens"], token_nums=2)
    declared = [p for _, p in model.named_trainable_parameters()]
    assert len({id(p) for p in declared}) == len(declared), "a parameter is listed twice"
    requires = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in declared} == requires
    assert {id(p) for p in model.trainable_parameters()} == requires
    # the head norm and the classifier are among them; no backbone tensor is
    assert {id(model.branch.head.head_norm.weight), id(model.branch.head.classifier.weight)} <= requires
    assert not requires & {id(p) for p in model.backbone.parameters()}
    names = [n for n, _ in model.named_parameters()]
    assert not [n for n in names if "pre_norm" in n], "the unused official pre_norm must not be created"
    assert not [n for n in names if re.search(r"out_combine|combine_weight", n)]


def test_trainable_count_formula_vit_base() -> None:
    """Spec section 3: 2,595,181 + 9,216 T (+ 769 per class) for ViT-B/16 (built without weights)."""
    backbone = synqt.build_backbone("vit_base_patch16_224")
    assert sum(p.numel() for p in backbone.parameters() if p.requires_grad) == 0
    for token_nums, without_classifier in ((1, 2_604_397), (4, 2_632_045), (16, 2_742_637)):
        assert without_classifier == 2_595_181 + 9_216 * token_nums
        for classes in (10, 397):
            model = synqt.build_model(backbone, classes, token_nums=token_nums)
            count = sum(p.numel() for p in model.parameters() if p.requires_grad)
            assert count == without_classifier + 769 * classes, (token_nums, classes, count)
            assert count == sum(p.numel() for p in model.trainable_parameters())
            assert count == expected_trainable(768, 12, token_nums, classes)


def test_trainable_count_vit_small_matches_closed_form() -> None:
    model = synqt.build_model("vit_small_patch16_224", 37, token_nums=4)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count == expected_trainable(384, 12, 4, 37)
    # the closed form written out once more: per block 2 Adapter48 + 4 Adapter8 + 4 LN + 2 scales,
    # head LN_out + Adapter48 + Linear(C, 3L) + LN_head, s_feat, queries, classifier
    c, depth, t, k = 384, 12, 4, 37
    a48, a8, ln = 2 * c * 48 + 48 + c, 2 * c * 8 + 8 + c, 2 * c
    assert count == depth * (2 * a48 + 4 * a8 + 4 * ln + 2) + 1 + 2 * ln + a48 + 3 * depth * (c + 1) \
        + depth * t * c + k * (c + 1)


# ---------------------------------------------------------------------------------------------------------------
# the image stream is timm's own


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_image_stream_equals_timm_blocks(variant: str) -> None:
    model = _random_model(VARIANTS[variant], token_nums=1).eval()
    bb = model.backbone
    x = images(2)
    ours = model.image_stream(x)
    with torch.no_grad():
        h = bb.norm_pre(bb.patch_drop(bb._pos_embed(bb.patch_embed(x))))
        timm_outs = []
        for blk in bb.blocks:
            h = blk(h)
            timm_outs.append(h)
        assert torch.allclose(bb.blocks(bb.norm_pre(bb.patch_drop(bb._pos_embed(bb.patch_embed(x))))), h,
                              atol=1e-6)
        # ... and the final norm of the last one is timm's forward_features
        assert torch.allclose(bb.norm(ours[-1]), bb.forward_features(x), atol=1e-5)
    expected_tokens = bb.num_prefix_tokens + 16
    for i, (a, b) in enumerate(zip(ours, timm_outs, strict=True)):
        assert a.shape == (2, expected_tokens, bb.embed_dim)
        err = ((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item()  # float32 relative error
        assert err < 1e-5, f"{variant}: block {i} output differs from timm's by {err:.3g} (relative)"
    ref = reference_image_stream(bb.state_dict(), x, num_heads=model.num_heads)
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        err = ((a.double() - b).abs().max() / b.abs().max().clamp(min=1.0)).item()
        assert err < 1e-5, f"{variant}: block {i} output differs from the float64 re-computation by {err:.3g}"


@pytest.mark.parametrize("variant", ["plain", "qk_norm"])
def test_bf16_autocast_tracks_timm_in_fp32(variant: str) -> None:
    """precision=bf16 on a CPU (bf16 image attention without the fused kernel): block outputs and logits
    stay within bf16 rounding of the fp32 results, and the query-branch gradients keep their direction."""
    model = _random_model(VARIANTS[variant], token_nums=3).eval()
    x = images(2)
    fp32_stream = model.image_stream(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_stream = model.image_stream(x)
    for i, (a, b) in enumerate(zip(bf16_stream, fp32_stream, strict=True)):
        err = ((a.float() - b).norm() / b.norm()).item()
        assert err < 2e-2, f"{variant}: bf16 block {i} output is {err:.3g} (relative) from fp32"
    model.train()
    grads = {}
    for precision in ("fp32", "bf16"):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            model.branch.seed_generator(5)
            logits = model(x)
        logits.float().square().mean().backward()
        grads[precision] = torch.cat([p.grad.flatten() for p in model.trainable_parameters() if p.grad is not None])
    cosine = torch.nn.functional.cosine_similarity(grads["fp32"], grads["bf16"], dim=0).item()
    assert cosine > 0.99, f"{variant}: bf16 gradients point elsewhere than fp32 ones (cosine {cosine:.4f})"


# ---------------------------------------------------------------------------------------------------------------
# LN_head


@pytest.mark.parametrize("variant", ["plain", "no_class_token"])
def test_head_norm_is_a_copy_of_the_final_norm(variant: str) -> None:
    kw = VARIANTS[variant]
    backbone = synqt.build_backbone(TINY, **kw)
    randomize_(backbone, 4)
    final = backbone.norm if isinstance(backbone.norm, nn.LayerNorm) else backbone.fc_norm  # avg pool: fc_norm
    assert isinstance(final, nn.LayerNorm)
    model = synqt.build_model(backbone, 5)
    head_norm = model.branch.head.head_norm
    assert torch.equal(head_norm.weight, final.weight) and torch.equal(head_norm.bias, final.bias)
    assert head_norm.eps == 1e-5 and final.eps == 1e-6
    assert head_norm.weight.data_ptr() != final.weight.data_ptr()
    assert head_norm.weight.requires_grad and not final.weight.requires_grad
    saved = final.weight.clone()
    with torch.no_grad():
        head_norm.weight.add_(1.0)
        head_norm.bias.add_(1.0)
    assert torch.equal(final.weight, saved), "modifying LN_head changed the backbone's norm: a view, not a copy"


# ---------------------------------------------------------------------------------------------------------------
# backbones SynQT cannot serve


def test_non_vit_backbone_by_name_is_refused() -> None:
    with pytest.raises(ModelError, match=r"resnet18.*not a timm VisionTransformer"):
        synqt.build_model("resnet18", 10)


def test_non_vit_backbone_object_is_refused() -> None:
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=0)
    with pytest.raises(ModelError, match=r"ResNet.*not a timm VisionTransformer"):
        synqt.build_model(resnet, 10)


def test_vit_with_foreign_blocks_is_refused() -> None:
    from timm.models.vision_transformer import ParallelScalingBlock

    vit = timm.create_model(TINY, pretrained=False, num_classes=0, block_fn=ParallelScalingBlock, **TINY_KW)
    with pytest.raises(ModelError, match=r"block 0 is ParallelScalingBlock"):
        synqt.build_model(vit, 10)


def test_unknown_backbone_name_is_refused() -> None:
    with pytest.raises(ModelError, match="no_such_vit_xyz"):
        synqt.build_model("no_such_vit_xyz", 10)


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ModelError, match="num_classes"):
        synqt.build_model(TINY, 0, **TINY_KW)
    with pytest.raises(ModelError, match="token_nums"):
        QueryBranch(embed_dim=32, depth=2, num_classes=3, token_nums=0)
