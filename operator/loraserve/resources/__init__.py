"""Pure builders: Kubernetes objects (as dicts) from a loraserve CR. No I/O."""
