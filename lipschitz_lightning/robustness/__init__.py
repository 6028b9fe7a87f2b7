"""What a certified bound buys and how tight it is, in pure torch: certified margins and radii,
adversarial attacks (PGD, the Lipschitz lower-bound search), weights at a lower precision."""
