"""Session-scoped fixtures for real services: a SeaweedFS S3 server and a local Ray cluster.

(Filled in with the pipeline tests.)
"""
