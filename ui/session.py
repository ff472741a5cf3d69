"""Who is asking, and how their mistakes reach the page: shared by every tab (no tab imports another for these).

A job, a run and a render belong to an *owner*: the logged-in user on a Space, else the browser's own id (kept in
its local storage across reloads), else this connection's session. ``user_errors`` turns a ``UserError`` into the
red message Gradio shows, with no traceback; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import functools
import inspect

import gradio as gr

from trainer.errors import UserError
from ui.hosting import owner_and_token

RENDER_QUEUE = "lora-render"  # grid, scoring and try-it share one render at a time (one base model in memory)


def owner_id(stored: str | None, request: gr.Request | None) -> str:
    """The browser's own id (kept in its local storage across reloads), else this connection's session."""
    if stored:
        return str(stored)
    return getattr(request, "session_hash", None) or "anonymous"


def owner_of(stored, request, profile=None) -> str:
    """The owner of this request's jobs and runs (the logged-in user on a Space, else the browser's id)."""
    return owner_and_token(owner_id(stored, request), profile)[0]


def owner_and_token_of(stored, request, profile=None, oauth_token=None) -> tuple[str, str | None]:
    """(owner, the token that fetches the model: the logged-in user's, else HF_TOKEN)."""
    return owner_and_token(owner_id(stored, request), profile, oauth_token)


def token_of(stored, request, profile=None, oauth_token=None) -> str | None:
    return owner_and_token_of(stored, request, profile, oauth_token)[1]


def user_errors(fn):
    """UserError → a red message in the page (no traceback); anything else is a bug and keeps its traceback.
    ``functools.wraps`` keeps the signature Gradio reads to inject the request, login and progress."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def generator(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except UserError as err:
                raise gr.Error(str(err), print_exception=False) from None
        return generator

    @functools.wraps(fn)
    def plain(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            raise gr.Error(str(err), print_exception=False) from None
    return plain


def clear_errors(triggers, targets: list) -> None:
    """Clear the red "Error" Gradio leaves on the outputs of an event that raised ``gr.Error``, when the user acts on
    it: each of ``triggers`` (event listeners, e.g. ``caption.input``) runs an event whose outputs are ``targets``,
    values untouched (gr.skip()). Gradio shows a component's last event's state, and without this the "Error" of a
    Train pressed with no image stayed on the page after the image was uploaded (until the next Train)."""
    def untouched():
        return gr.skip() if len(targets) == 1 else tuple(gr.skip() for _ in targets)

    for trigger in triggers:
        trigger(untouched, None, targets, api_name=False, queue=False, show_progress="hidden")
