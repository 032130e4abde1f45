"""The local runtime: a real control plane on 127.0.0.1 and fake GPU nodes, for development and tests."""
