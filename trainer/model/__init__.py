"""The model: loading (Hub id, local folder, tiny), memory tiers and weight storage, the LoRA, and checked intake of
weight files."""
