"""Training a backdoored model (stage 1) as a function: :func:`training.backdoor.train_backdoor`."""
