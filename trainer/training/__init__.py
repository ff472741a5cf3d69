"""One job's training: encode once, the step, the loop, previews, speed-ups (accel) and data parallelism."""
