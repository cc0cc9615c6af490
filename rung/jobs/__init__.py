"""What runs on the platform: the model family, parametrizations, data, training, experiments and export."""
