"""Public autograd functions, all built on the chunk driver in :mod:`.chunking`."""
