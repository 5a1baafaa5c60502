"""The `vmha` program: the composition root that joins the CLI with the layers above it."""
