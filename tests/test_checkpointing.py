"""Selective ("as-needed") gradient checkpointing: trainer/training/accel/checkpointing.py and the memory tiers that
ask for it. On the CPU, on the tiny FLUX.1 transformer with peft's LoRA; the GPU side (the budget against a real
card's memory, the step time) is in bench/tier_bench.py."""
from __future__ import annotations

import pytest
import torch

from tests.test_quantize import flux_inputs, flux_loss, tiny_transformer
from trainer.errors import UserError
from trainer.training.accel.attention import flux_blocks
from trainer.training.accel.checkpointing import (FRAGMENTATION, GIB, SAFETY_GIB, CheckpointPlan, activation_budget,
                                                  apply_plan, measure_block_activations, plan_checkpointing)


def tiny_with_lora(seed: int = 0):
    from trainer.model.lora import add_lora

    transformer = tiny_transformer(seed=seed)
    params = add_lora(transformer, rank=4, alpha=4.0, seed=seed)
    with torch.no_grad():  # a LoRA whose B is not zero, so every layer's gradient flows through it
        for p in params:
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    transformer.train()
    return transformer, params


def inputs_with_tokens(image_tokens: int, seed: int = 0):
    from trainer.training.flow import latent_image_ids

    inputs, _ = flux_inputs(seed)
    side = int(image_tokens ** 0.5)
    g = torch.Generator().manual_seed(seed + 5)
    inputs["hidden_states"] = torch.randn(1, side * side, 16, generator=g)
    inputs["img_ids"] = latent_image_ids(2 * side, 2 * side, "cpu", torch.float32)
    return inputs


# --- the plan ------------------------------------------------------------------------------------------------

def test_the_plan_keeps_the_smallest_blocks_that_fit_and_recomputes_the_rest():
    plan = plan_checkpointing([5, 1, 3, 1], budget_bytes=4)
    # 1 + 1 fit, then 3 does not fit in the 2 left: the blocks of 3 and 5 are recomputed
    assert plan.checkpointed == (True, False, True, False)
    assert (plan.recomputed, plan.kept_bytes) == (2, 2)
    assert "recomputing 2 of 4 blocks" in plan.describe()


def test_no_budget_recomputes_every_block_and_a_large_one_none():
    nothing = plan_checkpointing([4, 4, 4], budget_bytes=0)
    assert nothing.checkpointed == (True, True, True) and "recomputing every block" in nothing.describe()
    everything = plan_checkpointing([4, 4, 4], budget_bytes=12)
    assert everything.checkpointed == (False, False, False) and everything.kept_bytes == 12
    assert "keeping every block" in everything.describe()


def test_the_budget_leaves_room_for_the_optimizer_the_recomputation_the_previews_and_a_margin():
    cap, in_use, lora, blocks, previews = 24 * GIB, 10 * GIB, GIB // 10, [GIB // 4, GIB // 2], int(2.5 * GIB)
    expected = (cap - (in_use + 3 * lora + GIB // 2 + previews + SAFETY_GIB * GIB)) / FRAGMENTATION
    assert activation_budget(cap, in_use, lora, blocks, previews) == int(expected)
    assert activation_budget(12 * GIB, in_use, lora, blocks, previews) == 0  # never negative


# --- measuring ----------------------------------------------------------------------------------------------

def test_each_block_s_saved_activations_are_measured_without_keeping_them_or_leaving_hooks():
    transformer, _ = tiny_with_lora()
    blocks = flux_blocks(transformer)
    sizes = measure_block_activations(transformer, lambda: transformer(**inputs_with_tokens(64)))
    assert len(sizes) == len(blocks) == 4 and all(s > 0 for s in sizes)
    # blocks of one kind save about the same (the first double block also saves views of the embedders' outputs)
    assert abs(sizes[0] - sizes[1]) < 0.1 * sizes[1] and abs(sizes[2] - sizes[3]) < 0.1 * sizes[3]
    assert all(not b._forward_hooks and not b._forward_pre_hooks for b in blocks)

    assert sizes == saved_bytes_keeping_the_graph(transformer, inputs_with_tokens(64))


def saved_bytes_keeping_the_graph(transformer, inputs) -> list[int]:
    """The same count from an ordinary forward whose graph (every saved tensor) stays alive, so no memory is reused:
    each block's distinct saved storages that are not weights."""
    blocks = flux_blocks(transformer)
    resident = {t.untyped_storage().data_ptr() for t in transformer.parameters()}
    sizes, seen, current = [0] * len(blocks), [set() for _ in blocks], [None]
    handles = [h for i, b in enumerate(blocks)
               for h in (b.register_forward_pre_hook(lambda *_, i=i: current.__setitem__(0, i)),
                         b.register_forward_hook(lambda *_: current.__setitem__(0, None)))]

    def keep(tensor):
        address = tensor.untyped_storage().data_ptr()
        if current[0] is not None and address not in resident and address not in seen[current[0]]:
            seen[current[0]].add(address)
            sizes[current[0]] += tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        output = transformer(**inputs)
    for handle in handles:
        handle.remove()
    del output
    return sizes


def test_more_image_tokens_save_more_activations():
    transformer, _ = tiny_with_lora()
    small = measure_block_activations(transformer, lambda: transformer(**inputs_with_tokens(64)))
    large = measure_block_activations(transformer, lambda: transformer(**inputs_with_tokens(256)))
    # the activations grow about as the tokens (8 text tokens + image tokens): 72 -> 264, 3.7x
    assert all(2.5 < big / little < 4.5 for big, little in zip(large, small))


def test_measuring_leaves_a_model_s_checkpointing_as_it_was():
    transformer, _ = tiny_with_lora()
    transformer.enable_gradient_checkpointing()
    calls = []
    with_checkpointing = measure_block_activations(transformer, lambda: calls.append(transformer.gradient_checkpointing)
                                                   or transformer(**inputs_with_tokens(64)))
    assert calls == [False] and transformer.gradient_checkpointing  # measured without, restored after
    assert all(s > 0 for s in with_checkpointing)


# --- applying ------------------------------------------------------------------------------------------------

def gradients_and_forward_counts(plan: CheckpointPlan | None, everything: bool = False):
    transformer, params = tiny_with_lora()
    if plan is not None:
        apply_plan(transformer, plan)
    elif everything:
        transformer.enable_gradient_checkpointing()
    counts = [0] * len(flux_blocks(transformer))
    for index, block in enumerate(flux_blocks(transformer)):
        # (a pre-hook: the recomputation in backward stops once it has what backward needs, before a forward hook)
        block.register_forward_pre_hook(lambda *_, i=index: counts.__setitem__(i, counts[i] + 1))
    loss = flux_loss(transformer, seed=3)
    loss.backward()
    return loss.item(), [p.grad.clone() for p in params], counts


def test_only_the_planned_blocks_run_again_in_backward_and_the_gradients_do_not_change():
    plan = CheckpointPlan(checkpointed=(True, False, False, True), block_bytes=(1, 1, 1, 1), budget_bytes=2)
    loss, grads, counts = gradients_and_forward_counts(plan)
    plain_loss, plain_grads, plain_counts = gradients_and_forward_counts(None)
    _, all_grads, all_counts = gradients_and_forward_counts(None, everything=True)
    assert plain_counts == [1, 1, 1, 1] and all_counts == [2, 2, 2, 2]
    assert counts == [2, 1, 1, 2]
    assert loss == plain_loss
    assert all(torch.equal(g, p) for g, p in zip(grads, plain_grads))
    assert all(torch.equal(g, p) for g, p in zip(all_grads, plain_grads))


def test_a_plan_for_another_model_is_refused():
    transformer, _ = tiny_with_lora()
    with pytest.raises(ValueError, match="3 blocks"):
        apply_plan(transformer, plan_checkpointing([1, 1, 1], 0))


# --- the tiers that ask for it --------------------------------------------------------------------------------

def test_the_24gb_and_12gb_tiers_checkpoint_as_needed_and_the_others_as_they_say():
    from trainer.model.tiers import load_tier

    as_needed = {name: load_tier(name).checkpoint_as_needed for name in ("full", "24gb", "16gb", "12gb")}
    assert as_needed == {"full": False, "24gb": True, "16gb": False, "12gb": True}
    assert all(load_tier(name).gradient_checkpointing for name in ("24gb", "16gb", "12gb"))


@pytest.mark.parametrize("value, as_needed, every_block", [("true", False, True), ("false", False, False),
                                                           ('"as-needed"', True, True)])
def test_a_tier_file_s_checkpointing_values(tmp_path, value, as_needed, every_block):
    from trainer.model.tiers import load_tier

    (tmp_path / "card.toml").write_text(f'description = "x"\nmin_card_gib = 8\nweights = "nf4"\n'
                                        f"gradient_checkpointing = {value}\n")
    tier = load_tier("card", tmp_path)
    assert (tier.checkpoint_as_needed, tier.gradient_checkpointing) == (as_needed, every_block)


def test_a_tier_file_with_another_checkpointing_value_is_refused_with_the_choices(tmp_path):
    from trainer.model.tiers import load_tier

    (tmp_path / "card.toml").write_text('description = "x"\nmin_card_gib = 8\nweights = "nf4"\n'
                                        'gradient_checkpointing = "sometimes"\n')
    with pytest.raises(UserError, match='true, false or "as-needed"'):
        load_tier("card", tmp_path)


def test_no_plan_on_the_cpu_or_when_the_user_asks_for_every_block():
    from types import SimpleNamespace

    from trainer.config import TrainingConfig
    from trainer.training.memory_plan import checkpoint_cap_gib

    cpu_parts = SimpleNamespace(checkpoint_cap_gib=20.0, device=torch.device("cpu"))
    assert checkpoint_cap_gib(cpu_parts, TrainingConfig()) is None
    assert checkpoint_cap_gib(SimpleNamespace(checkpoint_cap_gib=None, device=torch.device("cpu")),
                              TrainingConfig()) is None
