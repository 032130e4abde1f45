"""loraserve: a Kubernetes operator that deploys fine-tuned LLMs as custom resources."""

__version__ = "0.1.0"
