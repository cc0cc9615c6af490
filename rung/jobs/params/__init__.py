"""The parametrizations (SP, μP, Depth-μP, CompleteP) and the parameter roles they read."""
