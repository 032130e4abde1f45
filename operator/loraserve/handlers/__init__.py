"""Kopf handlers: thin. They read and write Kubernetes; the decisions live in pure modules."""
