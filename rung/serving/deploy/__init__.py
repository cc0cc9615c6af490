"""Serving on Ray Serve (and KubeRay's RayService)."""
