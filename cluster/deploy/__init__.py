"""Deployment: KubeRay manifests rendered from the typed pool config, their policy checks, and the capacity planner."""
