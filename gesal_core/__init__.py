"""GESAL learning engine: graph memory + SVF adapters + REINFORCE, free of any chat platform."""

__version__ = "0.1.0"
