"""rung: width/depth-scaled language models with hyperparameter transfer, trained on Ray + DeepSpeed and served."""

__version__ = "0.1.0"
