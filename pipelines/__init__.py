"""pulsepipe: pipelines."""
