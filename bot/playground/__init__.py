"""The local web playground: channels, members, votes, admin actions and a live graph.

`server.Playground` is the simulated platform; everything the bot does goes through
`bot.service.ChatService`, like on Discord and Slack.
"""

from .server import Playground, create_app

__all__ = ["Playground", "create_app"]
