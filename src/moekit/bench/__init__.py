"""Benchmarks that are part of the product (`moekit bench ...`)."""
