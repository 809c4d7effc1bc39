"""The fast tier: no Ray, no subprocess (make test-fast). A package, so that its module names never collide
with the slower tier's."""
