"""Built-in models whose weights ship inside the package (no download needed)."""
