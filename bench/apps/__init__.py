"""Baseline applications, served exactly like EventFlow's own process types."""
