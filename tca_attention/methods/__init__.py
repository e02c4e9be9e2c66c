"""Sparse-attention policies on the shared engine: one file per method (TCA: the tca/ package);
the protocol is base.Method."""
