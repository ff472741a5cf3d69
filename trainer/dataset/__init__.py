"""Stage 1 of the data's way: the user's image(s) -> a safe decoded image, its mask, advice, and the training-size
tensors. Nothing here knows a model family."""
