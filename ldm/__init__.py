"""Latent diffusion: the model core (attention, UNet, text, VAE, the bundle), data, training, evaluation."""
