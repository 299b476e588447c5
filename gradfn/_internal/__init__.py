"""Private helpers shared by every layer: argument checks, torch-version shims, the PRNG."""
