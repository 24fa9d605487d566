"""Cluster layer: Ray, Ray Data, Ray Train, DeepSpeed and webdataset wiring around ``robust``."""
