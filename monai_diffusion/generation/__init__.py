"""Everything between a trained autoencoder and a written sample: latents (``latents``: encoding, the cache, the
scale factor), conditioning (``conditioning``: covariates fitted on the training set, their embeddings), the
training objectives and samplers (``schedulers``: DDPM, DDIM, DPM-Solver++, rectified flow), sampling
(``sampling``: guidance, decoding, NIfTI output), the ControlNet that steers the UNet with a label map
(``controlnet``) and sampling image/label pairs from masks (``mask_sampling``)."""
