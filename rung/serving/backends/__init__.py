"""Engines other than rung's behind the same EngineClient surface."""
