"""Placeholder until this solver lands."""
