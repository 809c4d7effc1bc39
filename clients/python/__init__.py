"""The thin aevae client: numpy in, numpy out, and never a torch import."""
