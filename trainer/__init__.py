"""Single-image Flux LoRA trainer. Knows nothing of Gradio: the app and the CLI both drive it."""
