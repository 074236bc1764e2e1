"""Loopback fakes of the outside world (Discord gateway + REST, Slack Web API) and a
tiny engine builder shared by the bot tests."""
