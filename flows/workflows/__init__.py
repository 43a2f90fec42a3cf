"""Workflows: a source of structures through an ordered list of steps."""
