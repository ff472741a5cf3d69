"""Memory tiers (presets/memory/): which tier a GPU gets and why, and what a job does with it."""
from __future__ import annotations

import pytest
import torch

from trainer.training import job as train
from trainer.config import TrainingConfig
from trainer.errors import UserError
from trainer.model.tiers import AUTO, choose_tier, list_tiers, load_tier, tier_for_card, tier_names

CPU = torch.device("cpu")


def test_tiers_are_the_four_cards_largest_first_with_their_savings():
    tiers = list_tiers()
    assert [t.name for t in tiers] == ["full", "24gb", "16gb", "12gb"]
    assert [t.weights for t in tiers] == ["bf16", "fp8", "fp8", "nf4"]
    assert [t.gradient_checkpointing for t in tiers] == [False, True, True, True]
    # the preview CUDA graph's memory pool pushed 16/12 GB over their caps on the H100 (bench/RESULTS.md)
    assert [t.lean_previews for t in tiers] == [False, False, True, True]
    assert [t.cap_gib for t in tiers] == [None, 23.0, 15.0, 11.0]  # the card minus 1 GiB for context and display
    for tier in tiers[1:]:
        assert tier.min_card_gib < tier.card_gib, "a card sold as N GB reports a little less than N GiB"


@pytest.mark.parametrize("total_gib, expected", [
    (79.2, "full"),  # H100 80GB
    (39.4, "full"),  # A100 40GB
    (23.6, "24gb"),  # RTX 4090
    (22.1, "24gb"),  # A10G
    (15.6, "16gb"),  # RTX 4060 Ti 16GB
    (11.7, "12gb"),  # RTX 3060 12GB
])
def test_a_card_gets_the_fastest_tier_it_fits(total_gib, expected):
    assert tier_for_card(total_gib).name == expected


def test_the_choice_says_which_gpu_and_why():
    choice = choose_tier(AUTO, CPU, gpu=("NVIDIA GeForce RTX 3060", 11.7))
    assert choice.tier.name == "12gb"
    assert "RTX 3060" in choice.reason and "11.7 GiB" in choice.reason and "NF4" in choice.reason


def test_a_card_below_every_tier_is_refused_with_what_to_do():
    with pytest.raises(UserError, match=r"8\.0 GiB.*training with FLUX.1 needs.*at least 12 GB.*tiny-demo"):
        choose_tier(AUTO, CPU, gpu=("NVIDIA GeForce RTX 3070", 8.0))
    with pytest.raises(UserError, match=r"rendering with FLUX.1 needs"):  # Compare / Try it / grid say so
        choose_tier(AUTO, CPU, gpu=("NVIDIA GeForce RTX 3070", 8.0), task="rendering")


def test_auto_without_a_gpu_or_on_the_tiny_model_trades_nothing():
    assert choose_tier(AUTO, CPU).tier.name == "full"
    assert choose_tier(AUTO, CPU, tiny_model=True, gpu=("RTX 3060", 11.7)).tier.name == "full"


def test_a_named_tier_is_used_as_chosen():
    choice = choose_tier("16gb", CPU, gpu=("NVIDIA H100 80GB HBM3", 79.2))
    assert choice.tier.name == "16gb" and "as chosen" in choice.reason and "H100" in choice.reason


def test_config_accepts_tier_names_and_refuses_others():
    assert tier_names() == [AUTO, "full", "24gb", "16gb", "12gb"]
    assert TrainingConfig(memory_tier="12gb").memory_tier == "12gb"
    with pytest.raises(UserError, match="memory_tier must be one of"):
        TrainingConfig(memory_tier="8gb")
    with pytest.raises(UserError, match="Unknown memory tier"):
        load_tier("../character-rank4-400")


def test_out_of_memory_names_the_next_smaller_tier():
    cfg = TrainingConfig()
    message = train.oom_advice(cfg, "24gb")
    assert "'24gb' memory tier" in message and "'16gb' tier" in message and "checkpoints saved so far are kept" in message
    assert "'12gb' tier" in train.oom_advice(cfg, "16gb")
    # on the smallest tier there is no smaller one: the preset advice remains
    assert "memory tier" not in train.oom_advice(cfg, "12gb") and "GPU ran out of memory" in train.oom_advice(cfg, "12gb")


def test_the_page_explains_the_tier_it_will_use():
    from ui.settings_step import memory_tier_choices, memory_tier_notice

    assert [value for _, value in memory_tier_choices()] == tier_names()
    assert "tiny demo" in memory_tier_notice(AUTO, "tiny-demo")
    assert "'12gb' as chosen" in memory_tier_notice("12gb", "tiny-demo")


# ---- a whole job on a tier (CPU, tiny-demo, the real run_training) ------------------------------------------

def _train(folder, tier: str):
    from tests.test_resume import lora_of, new_run
    from trainer.events import Failed, Finished, Status
    from trainer.runs.folder import RunFolder
    from trainer.training.job import run_training

    run = new_run(folder, steps=3, save_every=3, memory_tier=tier)
    events = list(run_training(run))
    assert isinstance(events[-1], Finished) and not events[-1].stopped, [e for e in events if isinstance(e, Failed)]
    statuses = [e.message for e in events if isinstance(e, Status)]
    return lora_of(run.checkpoint_path(3)), statuses, RunFolder.open(run.path)


def test_a_quantized_tier_trains_the_same_lora_shape_close_to_the_full_tier(tmp_path):
    """The 12gb tier's job really runs on NF4 weights (its LoRA differs from the full tier's) and learns the same
    thing (same keys and shapes, strongly correlated updates)."""
    full, _, _ = _train(tmp_path / "full", "full")
    nf4, statuses, run = _train(tmp_path / "nf4", "12gb")
    assert run.memory_tier == "12gb" and run.config.memory_tier == "12gb"
    assert any("'12gb' as chosen" in s for s in statuses)
    assert any("NF4" in s and "layer by layer" in s for s in statuses)
    assert full.keys() == nf4.keys() and all(full[k].shape == nf4[k].shape for k in full)
    trained = [k for k in full if "lora_B" in k]  # B starts at zero: after 3 steps it is the learned update
    assert any(not torch.equal(full[k], nf4[k]) for k in trained), "the 12gb tier trained on unquantized weights"
    a = torch.cat([full[k].flatten().float() for k in trained])
    b = torch.cat([nf4[k].flatten().float() for k in trained])
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
    print(f"LoRA B after 3 steps, 12gb (nf4) vs full: cosine {cosine:.4f}")
    assert cosine > 0.9
