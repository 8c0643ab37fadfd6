"""Captures: how each trainable layer's factors (its input and the gradient at its output)
are obtained per sample. ``native`` runs an nn.Sequential MLP in C++ and fuses the
activation derivative into the outer products; ``hooks`` serves any nn.Module."""
