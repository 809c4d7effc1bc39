"""Generated protobuf and gRPC code for the aevae.v1 API: regenerate with `make proto`, never edit."""
