"""The live anomaly dashboard: `resilient dashboard RUN_DIR` (FastAPI + Plotly, served offline)."""
