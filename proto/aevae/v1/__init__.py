"""The aevae.v1 API: the .proto contract, its generated code (regenerate with `make proto`, never edit the
*_pb2* files), and `tensors`, the one numpy <-> Tensor codec that the services and the client share."""
