"""Prefect flows, one per pipeline stage; each logs to MLflow. See flows/_stage.py for the wiring."""

from flows.environment import apply_defaults

# Before anything imports prefect or mlflow: their settings are read at import time.
apply_defaults()
