"""Chat-platform side of gesal-bot: adapters, admin commands, scheduler, CLI."""
