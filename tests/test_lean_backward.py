"""A half-precision fit on a CPU keeps 2-byte tensors for its backward pass, and its gradients stay those of the plain
path: transformers' own sdpa attention on fp32 copies, peft's LoRA with `nn.Dropout`, the model's own MLP."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from lightning_modules.backbone import attach_lora, load_causal_lm
from lightning_modules.lean_backward import BooleanMaskDropout, exact_copy, saved_as, upcast

REFERENCE_ATTENTION = "test_reference_fp32_sdpa"


def reference_fp32_sdpa(module, query, key, value, attention_mask, **kwargs):
    """The attention a bf16 CPU fit computed before: transformers' sdpa on fp32 copies, autograd keeping them."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
    return out.to(query.dtype), weights


def plain_lora(tiny_model_dir: str):
    """The same bf16 model and LoRA through peft and transformers alone (no lean backward)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(REFERENCE_ATTENTION, reference_fp32_sdpa)
    AttentionMaskInterface.register(REFERENCE_ATTENTION, sdpa_mask)
    model = load_causal_lm(tiny_model_dir, quantize_4bit=False, dtype="bfloat16")
    model.config._attn_implementation = REFERENCE_ATTENTION
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def step(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, seed: int) -> tuple[float, dict]:
    """One training forward and backward (dropout on) from `seed`: the loss and every LoRA weight's gradient."""
    model.train()
    torch.manual_seed(seed)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    loss = torch.nn.functional.cross_entropy(logits[:, -1].float(), torch.tensor([3, 5]))
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return loss.item(), grads


def test_a_bf16_fit_step_has_the_gradients_of_the_plain_path(tiny_model_dir):
    lean = attach_lora(
        load_causal_lm(tiny_model_dir, quantize_4bit=False, dtype="bfloat16"),
        r=4,
        alpha=8,
        dropout=0.3,
        target_modules=["q_proj", "v_proj"],
        quantized=False,
        gradient_checkpointing=False,
    )
    torch.manual_seed(0)
    for parameter in lean.parameters():
        if parameter.requires_grad:  # LoRA B starts at zero, which would leave A without a gradient
            parameter.data.normal_(0, 0.5)
    plain = plain_lora(tiny_model_dir)
    plain.load_state_dict(lean.state_dict())  # the same LoRA weights (and the same base)
    assert any(isinstance(m, BooleanMaskDropout) for m in lean.modules())
    input_ids = torch.tensor([[4, 9, 12, 7, 20, 11, 6, 8], [5, 13, 10, 17, 9, 0, 0, 0]])
    attention_mask = (input_ids != 0).long()  # a right-padded batch, as the fit's
    for seed in (0, 1):
        lean_loss, lean_grads = step(lean, input_ids, attention_mask, seed)
        plain_loss, plain_grads = step(plain, input_ids, attention_mask, seed)
        assert lean_loss == plain_loss
        assert lean_grads.keys() == plain_grads.keys() and len(lean_grads) == 8  # A and B of q and v, 2 layers
        for name, grad in lean_grads.items():
            assert grad.dtype == torch.float32 and grad.abs().max() > 0, name
            # the same kernels on the same values: equal, but for the order of a few sums of fp32 products
            assert torch.allclose(grad, plain_grads[name], rtol=1e-5, atol=1e-7), name


def test_the_fp32_copy_is_not_kept_and_the_gradient_is_unchanged():
    small = torch.randn(3, 5, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(3, 5, requires_grad=True)
    big, entry = exact_copy(small, upcast)
    big_ref = weakref.ref(big)
    with saved_as({big.data_ptr(): entry}):
        out = (big * weight).sum()  # mul keeps `big` for the gradient of `weight`
    del big
    gc.collect()
    assert big_ref() is None  # autograd kept the bf16 tensor, not the fp32 copy
    out.backward()
    assert torch.equal(weight.grad, small.detach().float())  # d/dweight of sum(big * weight) is big itself


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_the_boolean_mask_dropout_is_torch_dropout_value_for_value(p):
    x = torch.randn(4, 7, 33, requires_grad=True)
    ours, theirs = BooleanMaskDropout(p), torch.nn.Dropout(p)
    torch.manual_seed(3)
    y_ours = ours(x)
    (g_ours,) = torch.autograd.grad((y_ours * torch.arange(33.0)).sum(), x)
    torch.manual_seed(3)
    y_theirs = theirs(x)
    (g_theirs,) = torch.autograd.grad((y_theirs * torch.arange(33.0)).sum(), x)
    assert torch.equal(y_ours, y_theirs) and torch.equal(g_ours, g_theirs)
    assert 0 < (y_ours == 0).float().mean() < 1
    ours.eval()
    assert torch.equal(ours(x), x)  # eval mode: no dropout


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_inference_forward_has_the_logits_of_the_plain_model(tiny_model_dir, dtype):
    # the gated MLPs write act_fn(gate) * up over their own gate projection when autograd does not record; LoRA on
    # gate_proj and up_proj makes those projections peft's sums, the case where a shared tensor would show first
    from peft import LoraConfig, get_peft_model

    targets = ["gate_proj", "up_proj", "q_proj"]
    lean = attach_lora(
        load_causal_lm(tiny_model_dir, quantize_4bit=False, dtype=dtype),
        r=4,
        alpha=8,
        dropout=0.0,
        target_modules=targets,
        quantized=False,
        gradient_checkpointing=False,
    )
    torch.manual_seed(0)
    for parameter in lean.parameters():
        if parameter.requires_grad:  # LoRA B starts at zero: the adapter would add nothing
            parameter.data.normal_(0, 0.5)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")
    plain = get_peft_model(load_causal_lm(tiny_model_dir, quantize_4bit=False, dtype=dtype), config)
    plain.load_state_dict(lean.state_dict())
    lean.eval(), plain.eval()
    input_ids = torch.tensor([[4, 9, 12, 7, 20, 11, 6, 8], [5, 13, 10, 17, 9, 0, 0, 0]])
    attention_mask = (input_ids != 0).long()
    with torch.no_grad():
        embeddings = lean.get_input_embeddings()(input_ids)
        kept = embeddings.clone()
        ours = lean(inputs_embeds=embeddings, attention_mask=attention_mask).logits
        theirs = plain(input_ids=input_ids, attention_mask=attention_mask).logits
    assert torch.equal(embeddings, kept)  # the caller's input is never written over
    assert ours.abs().max() > 0
    # the same products and the same activation, in another tensor: equal but for the last bits of a few sums
    tolerance = {"float32": 1e-5, "bfloat16": 2e-2}[dtype]
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("activation", [torch.nn.SiLU(), torch.nn.GELU()])
def test_the_in_place_swiglu_is_the_activation_times_up(activation):
    from lightning_modules.lean_backward import in_place_activation

    gate, up = torch.randn(5, 11), torch.randn(5, 11)
    expected = activation(gate) * up  # computed before gate is written over
    assert torch.equal(in_place_activation(activation)(gate.clone()).mul_(up), expected)
