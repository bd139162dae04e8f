"""Helpers shared by the test stages (a test module never imports another test module)."""
