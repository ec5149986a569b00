"""The long-lived daemon that keeps a worker alive and records why it ended."""
