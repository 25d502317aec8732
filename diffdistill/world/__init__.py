"""The embedded tiny world (Fashion-MNIST, two teachers, metric networks)."""
