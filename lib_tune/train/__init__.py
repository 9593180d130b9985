"""Training: dataset discovery, caption augmentation, bucketing, validation, latent cache, output metadata,
and (elsewhere in this package) the training loop. Imports without the webui."""
