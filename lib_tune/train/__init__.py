"""Training: dataset discovery and the dataset check, caption augmentation, bucketing, latent and text caches, the
interface to the diffusion model, the training loop with held-out validation, training states and the trained
file's metadata. Imports without the webui."""
