"""What every Slack listener shares about Slack's Web API: the platform's name, the
errors a call raises once the client's retries are spent and how to say why in a few
words, and the team a channel's key is stored under.
"""

from __future__ import annotations

import aiohttp
from slack_sdk.errors import SlackApiError, SlackRequestError

PLATFORM = "slack"
# Where an export may be downloaded from, as scheme://host[:port]. The request carries
# the bot token, so only Slack's own file host gets it; `build_app(file_origins=...)`
# replaces the list (tests serve files on loopback).
SLACK_FILE_ORIGINS = ("https://files.slack.com",)


def error_code(exc: SlackApiError) -> str:
    """Slack's error code (``channel_not_found``…), or the HTTP status when there is none."""
    data = getattr(exc.response, "data", None)
    if isinstance(data, dict) and data.get("error"):
        return str(data["error"])
    return f"HTTP {getattr(exc.response, 'status_code', '?')}"


# What a Web API call raises once the client's retries are spent: Slack refused
# (SlackApiError), an upload failed (SlackRequestError), or the network did.
WEB_ERRORS = (SlackApiError, SlackRequestError, aiohttp.ClientError, TimeoutError)


def why_failed(exc: BaseException) -> str:
    """A Web API call's failure in a few words: Slack's error code, or the kind of
    network failure (the client has already retried rate limits and dropped
    connections)."""
    if isinstance(exc, SlackApiError):
        return error_code(exc)
    return type(exc).__name__


def channel_team(body: dict, context=None, event: dict | None = None) -> str:
    """The team a channel's key (``slack:<team>:<channel>``) is stored under, for every
    kind of request: the workspace that installed the bot, so one channel has one key
    whoever acts in it.

    In a shared (Slack Connect) channel ``event.team``/``user_team`` name the actor's
    team and the body's ``team_id`` the team the event came from, both of which differ
    from member to member. Bolt's ``context.team_id`` is the installing workspace
    (``authorizations[0].team_id`` for events, the request's team for commands and
    buttons); the body's ``team_id``, then ``team.id`` (``null`` in org-wide installs),
    then ``event.team`` stand in only when it is missing."""
    team = context.get("team_id") if context is not None else None
    if team:
        return str(team)
    body_team = body.get("team")
    event = event or {}
    return str(
        body.get("team_id")
        or (body_team.get("id") if isinstance(body_team, dict) else body_team)
        or event.get("team")
        or "T"
    )
