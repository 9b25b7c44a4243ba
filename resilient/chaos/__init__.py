"""Chaos: the controller the supervisor calls at its named points, seeded random schedules, the
driver-side injection, and the report. The fault catalogue itself is `resilient.catalogue`."""
