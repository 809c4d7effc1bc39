"""The Ray Train job that trains the AE and the VAE and writes versions into the model repository."""
