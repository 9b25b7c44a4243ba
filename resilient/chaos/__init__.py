"""Chaos: the fault catalogue, random schedules, injection into a running job, and the report."""
