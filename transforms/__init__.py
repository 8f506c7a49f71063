"""pulsepipe: transforms."""
