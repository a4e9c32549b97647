"""cura's LoRA training against PEFT on tiny models in float32: the same gradients, the same 5 steps.

cura's side is the training stack itself (`attach_lora`, `cura.train.steps.loss_sum`, `PagedAdamW`,
gradient clipping, `lr_lambda`); PEFT's is `get_peft_model` + transformers' own loss + `torch.optim.AdamW`
+ transformers' cosine schedule. Both start from the same base and the same A/B weights (B non-zero, so
gradients reach A too). Tolerance: float32 round-off only (rtol 1e-5; absolute error relative to each tensor's
scale, as the op order differs: chunked loss, one addmm for the LoRA update).
"""

from __future__ import annotations

import peft
import pytest
import torch
from transformers import get_cosine_schedule_with_warmup

from cura.adapters import LoraConfig, adapter_state_dict, attach_lora, lora_layers
from cura.constants import IGNORE_INDEX
from cura.optim import PagedAdamW
from cura.train.steps import count_trained_tokens, loss_sum, lr_lambda
from tiny import VOCAB, tiny_model

R, ALPHA, LR, STEPS, CLIP = 4, 8.0, 5e-3, 5, 0.3


def _pair(arch: str):
    """(cura model, PEFT model) on identical bases with identical random A and B."""
    ours = tiny_model(arch)
    attach_lora(ours, LoraConfig(r=R, alpha=ALPHA, dropout=0.0))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(ours).values():
            layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=gen) * 0.1)
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.1)
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear")
    theirs = peft.get_peft_model(tiny_model(arch), config)
    result = peft.set_peft_model_state_dict(theirs, adapter_state_dict(ours))
    assert not [k for k in result.missing_keys if "lora_" in k]
    return ours.train(), theirs.train()


def _peft_name(name: str) -> str:
    return name.removeprefix("base_model.model.").replace(".default.", ".")


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    return {_peft_name(n): p for n, p in model.named_parameters() if p.requires_grad}


def _batch(seed: int) -> dict[str, torch.Tensor]:
    """Two right-padded rows with a masked prompt: ids (2, 16), labels -100 on prompt and padding."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 16), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    ids[1, 11:] = 0
    labels = ids.clone()
    labels[0, :5] = IGNORE_INDEX
    labels[1, :3] = IGNORE_INDEX
    labels[mask == 0] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _our_loss(model, batch) -> torch.Tensor:
    n = count_trained_tokens(batch)  # the loss scale, as the training step passes it
    total, _ = loss_sum(model, batch, chunk_tokens=7, grad_scale=1.0 / n)  # several chunks, as in training
    return total / n


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
def test_lora_gradients_match_peft(arch):
    ours, theirs = _pair(arch)
    batch = _batch(0)
    loss = _our_loss(ours, batch)
    loss.backward()
    ref = theirs(**batch).loss
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    mine, peft_params = _trainable(ours), _trainable(theirs)
    assert set(mine) == set(peft_params) and len(mine) > 0
    for name, param in mine.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
        ref = peft_params[name].grad  # round-off is relative to the tensor's scale, not to each element's
        torch.testing.assert_close(param.grad, ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item(), msg=name)


def test_five_step_training_trajectory_matches_peft():
    ours, theirs = _pair("llama")
    mine, peft_params = _trainable(ours), _trainable(theirs)
    names = sorted(mine)
    opt_ours = PagedAdamW([mine[n] for n in names], lr=LR, weight_decay=0.01)
    opt_theirs = torch.optim.AdamW([peft_params[n] for n in names], lr=LR, weight_decay=0.01, foreach=False)
    sched_ours = torch.optim.lr_scheduler.LambdaLR(opt_ours, lr_lambda("cosine", 0, STEPS))
    sched_theirs = get_cosine_schedule_with_warmup(opt_theirs, 0, STEPS)
    losses = []
    for step in range(STEPS):
        batch = _batch(10 + step)
        pair = []
        for model, params, opt, sched, loss_fn in (
            (ours, mine, opt_ours, sched_ours, _our_loss),
            (theirs, peft_params, opt_theirs, sched_theirs, lambda m, b: m(**b).loss),
        ):
            loss = loss_fn(model, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([params[n] for n in names], CLIP)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            pair.append(loss.item())
        losses.append(pair)
        assert pair[0] == pytest.approx(pair[1], rel=1e-5), (step, pair)
    for name in names:
        # AdamW's step is g / (|g| + eps)-like: on an element whose gradient is within a few eps of 0, float32
        # round-off moves that one step by up to ~lr / 500 (measured 1e-5 on an AMD EPYC); a wrong gradient
        # or update moves every element by O(lr) and the per-step losses above already catch it.
        torch.testing.assert_close(mine[name].detach(), peft_params[name].detach(), rtol=1e-5, atol=LR / 100)
    moved = max((mine[n].detach() - adapter_start).abs().max() for n, adapter_start in _start(names))
    assert moved > 1e-3


def _start(names):
    """The A/B weights both runs started from (a fresh pair is built the same way)."""
    start, _ = _pair("llama")
    params = _trainable(start)
    return [(n, params[n].detach()) for n in names]
