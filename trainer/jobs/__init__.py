"""Jobs: the worker threads and queue of the app, and the protocol with a multi-GPU training process."""
