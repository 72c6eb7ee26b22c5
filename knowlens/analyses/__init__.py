"""Analyses: answers graded against the world, behaviour gates, reports."""
