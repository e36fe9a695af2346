"""octomil-lite: a lightweight, single-process model registry speaking the Octomil Models API."""

__version__ = "0.1.0"
