"""The HTML page and PNG picture of query hits (`ctrak query --report`, `ctrak demo`)."""
