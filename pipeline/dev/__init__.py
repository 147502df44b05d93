"""Development tooling, not a pipeline stage: the local S3 server used by tests and infra/dev."""
