"""aevae: serve and explore autoencoder latent spaces.

The package is light on purpose: importing `aevae` or `aevae.client` never imports torch.
"""

__version__ = "0.1.0"
