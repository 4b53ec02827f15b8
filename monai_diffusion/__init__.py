"""3D latent diffusion toolkit: config, data, training loops, memory tools and CLIs."""
