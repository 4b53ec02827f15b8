"""Everything between a trained autoencoder and a written sample: latents (encoding, the cache, the scale
factor), conditioning (covariates fitted on the training set, their embeddings) and sampling (schedulers,
guidance, decoding, NIfTI output)."""
