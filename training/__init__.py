"""Train the seed classifiers and export them into a Triton-layout model repository."""
