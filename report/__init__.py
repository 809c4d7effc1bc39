"""`aevae report`: the seed's figures and claims, measured on the served models."""
