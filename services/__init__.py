"""The gRPC encoder and decoder services over the model repository."""
