"""The `loraserve` command line."""
