"""After training: checkpoint grids, rendering with a LoRA, the advisor, export and publishing."""
